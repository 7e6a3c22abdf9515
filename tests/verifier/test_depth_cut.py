"""The decode loop cuts a tree at the target's max_tree_depth (kernels.attention: deeper rows would not
be exact): the output stays plain decoding's, and the drafter's feedback speaks its own node ids."""

import torch

from proto.tree import DraftTree
from tests.fakes import FakeTarget, fake_logits
from verifier.engine import generate
from verifier.rules import SamplingParams


class GreedyOracleBehindDecoy:
    """A drafter over the fake target (named fake): a wrong root with a chain under it, then the target's
    greedy continuation as a second chain; it records the feedback it gets."""

    def __init__(self, vocab: int):
        self.vocab, self.context, self.feedback = vocab, [], []

    def draft(self, update):
        self.context += update.new_tokens
        self.feedback.append(update.feedback)
        greedy, ctx = [], list(self.context)
        for _ in range(3):
            greedy.append(int(fake_logits(tuple(ctx), self.vocab).argmax()))
            ctx.append(greedy[-1])
        if update.max_nodes < 6:  # the last steps' budget
            return None
        decoy = (greedy[0] + 1) % self.vocab
        # nodes 0-2: decoy chain (depths 1-3); nodes 3-5: the greedy chain (depths 1-3)
        return DraftTree([decoy, decoy, decoy] + greedy, [-1, 0, 1, -1, 3, 4], self.vocab, update.max_nodes)

    def close(self):
        pass


def test_a_tree_cut_at_the_targets_max_depth_keeps_the_output_and_feeds_back_the_drafters_node_ids():
    vocab, prompt = 50, [3, 4, 5]
    plain = [t for s in generate(FakeTarget(vocab), prompt, SamplingParams(), 20, set()) for t in s.tokens]
    target = FakeTarget(vocab)
    target.max_tree_depth = 2  # as the real target near a block boundary: nodes 2 and 5 (depth 3) are cut
    drafter = GreedyOracleBehindDecoy(vocab)
    steps = list(generate(target, prompt, SamplingParams(), 20, set(), drafter, max_nodes=6))
    assert [t for s in steps for t in s.tokens] == plain
    cut = [s for s in steps[1:] if s.tree_nodes]
    assert cut and all(s.tree_nodes == 4 and s.accepted == 2 for s in cut)  # 6 drafted, 4 verified
    fed = [f for f in drafter.feedback if f is not None]
    assert fed and all(f.accepted == [3, 4] for f in fed)  # the greedy chain, in the drafter's own ids
    assert all(set(f.target_probs) <= {0, 3, 4} for f in fed)


def test_within_depth_keeps_whole_levels_and_reindexes():
    q = torch.rand(7, 10) + 0.01  # [N+1, V] a sampled tree's rows
    tree = DraftTree([1, 2, 3, 4, 5, 6], [-1, 0, 1, -1, 3, 0], 10, 6, q)
    cut, kept = tree.within_depth(2)
    assert kept == [0, 1, 3, 4, 5]
    assert cut.tokens == (1, 2, 4, 5, 6) and cut.parents == (-1, 0, -1, 2, 0)
    assert torch.equal(cut.draft_probs, q[[0, 1, 2, 4, 5, 6]])
    assert tree.within_depth(0) == (None, [])
