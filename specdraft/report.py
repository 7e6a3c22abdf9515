"""The one table printer of the application: eval, bench and the bandit experiment print through it."""


def print_columns(cols: list[tuple[str, int]], rows: list[list]) -> None:
    """A header and rows, each cell right-aligned to its column's width."""
    for cells in [[name for name, _ in cols]] + rows:
        print("".join(f"{str(c):>{w}}" for c, (_, w) in zip(cells, cols)))
