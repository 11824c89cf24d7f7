"""The one-uniform-per-row sampler (grpo.rollout.sampling) draws from the same distribution as torch.multinomial:
chi-square tests on fixed probabilities (against the exact expectation and against multinomial's own draws),
with a slightly wrong sampler as the control that the tests can tell; tokens of probability 0 are never drawn,
whatever the uniform; and through the decode loop, a tiny model's responses keep multinomial's distribution."""

import functools

import pytest
import torch

from grpo.rollout import generate as generate_mod
from grpo.rollout.sampling import BLOCK, pick, sample_rows

torch.set_num_threads(1)

VOCAB = 1000  # not a multiple of BLOCK: the padded last block is exercised
DRAWS = 100_000
ZEROS = [0, BLOCK - 1, BLOCK, 2 * BLOCK + 7, VOCAB - 1]


def _probs(seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=g) * scale
    logits[ZEROS] = float("-inf")
    return logits.softmax(-1)


def _counts(sampler, p: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    rows = 10_000
    for _ in range(draws // rows):
        ids = sampler(p.expand(rows, VOCAB).contiguous())
        counts += torch.bincount(ids, minlength=VOCAB).double()
    return counts


def _multinomial(probs):
    return torch.multinomial(probs, 1).squeeze(1)


@functools.cache
def _multinomial_counts(scale: float) -> torch.Tensor:
    return _counts(_multinomial, _probs(scale=scale), DRAWS, seed=2)


def _chi2_p(stat: float, df: int) -> float:
    """Upper tail of the chi-square distribution: Q(df/2, stat/2)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _bins(expected: torch.Tensor) -> torch.Tensor:
    """Bin index per token: tokens expected >= 5 times alone, the rest pooled (the chi-square approximation)."""
    big = expected >= 5
    index = torch.full_like(expected, -1, dtype=torch.long)
    index[big] = torch.arange(int(big.sum()))
    index[~big] = int(big.sum())
    return index


def _gof(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p.double() * counts.sum()
    index = _bins(expected)
    nb = int(index.max()) + 1
    obs = torch.zeros(nb, dtype=torch.float64).index_add_(0, index, counts)
    exp = torch.zeros(nb, dtype=torch.float64).index_add_(0, index, expected)
    keep = exp > 0
    return _chi2_p(float(((obs - exp)[keep] ** 2 / exp[keep]).sum()), int(keep.sum()) - 1)


def _homogeneity(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> float:
    """Two samples of the same size from one distribution? (chi-square on a 2 x bins table)."""
    index = _bins(p.double() * a.sum())
    nb = int(index.max()) + 1
    oa = torch.zeros(nb, dtype=torch.float64).index_add_(0, index, a)
    ob = torch.zeros(nb, dtype=torch.float64).index_add_(0, index, b)
    keep = (oa + ob) > 0
    oa, ob = oa[keep], ob[keep]
    ea = eb = (oa + ob) / 2
    return _chi2_p(float(((oa - ea) ** 2 / ea + (ob - eb) ** 2 / eb).sum()), len(oa) - 1)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_same_distribution_as_multinomial(scale):
    p = _probs(scale=scale)
    ours = _counts(sample_rows, p, DRAWS, seed=1)
    theirs = _multinomial_counts(scale)
    assert ours[ZEROS].sum() == 0 and theirs[ZEROS].sum() == 0
    assert _gof(ours, p) > 1e-3
    assert _gof(theirs, p) > 1e-3  # the test's calibration: torch's own sampler passes it
    assert _homogeneity(ours, theirs, p) > 1e-3


def test_a_slightly_wrong_sampler_fails_the_same_tests():
    """The control: sampling at temperature 1/1.05 instead of 1 (probabilities p^1.05, renormalised) is told apart."""
    p = _probs()
    wrong = _counts(lambda q: sample_rows(q ** 1.05), p, DRAWS, seed=1)
    theirs = _multinomial_counts(3.0)
    assert _gof(wrong, p) < 1e-6
    assert _homogeneity(wrong, theirs, p) < 1e-6


def test_one_uniform_per_row_from_the_generator():
    p = _probs().expand(4, VOCAB).contiguous()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = sample_rows(p, generator=g1)
    unit = torch.rand(4, 1, dtype=torch.float64, generator=g2)
    assert torch.equal(a, pick(p, unit))
    assert torch.equal(torch.rand(1, dtype=torch.float64, generator=g1), torch.rand(1, dtype=torch.float64, generator=g2))


@pytest.mark.parametrize("unit", [0.0, 0.5, 1 - 2 ** -53])
def test_tokens_of_probability_zero_are_never_drawn(unit):
    rows = []
    for only in (0, BLOCK - 1, BLOCK, VOCAB - 1, 300):  # one allowed token, at block edges and inside
        r = torch.zeros(VOCAB)
        r[only] = 0.3
        rows.append(r)
    split = torch.zeros(VOCAB)
    split[[3, 700]] = torch.tensor([1e-30, 1.0])  # a huge dynamic range across blocks
    rows.append(split)
    trailing = torch.zeros(VOCAB)
    trailing[BLOCK + 10] = 1e-8  # a block whose mass ends early, then zeros to its end
    trailing[BLOCK + 11] = 0.7
    rows.append(trailing)
    probs = torch.stack(rows)
    ids = pick(probs, torch.full((len(rows), 1), unit, dtype=torch.float64))
    assert bool((probs[torch.arange(len(rows)), ids] > 0).all()), ids.tolist()
    assert ids[:5].tolist() == [0, BLOCK - 1, BLOCK, VOCAB - 1, 300]
    if unit == 0.0:
        assert ids[5] == 3 and ids[6] == BLOCK + 10  # the first positive token
    if unit > 0.5:
        assert ids[5] == 700 and ids[6] == BLOCK + 11  # the last positive token, never the zeros after it


def test_many_rows_of_float32_rounding_never_draw_a_zero():
    """Float32 softmax rows with half their entries masked: 10k rows x 20 draws, none on a masked token."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10_000, VOCAB, generator=g) * 8
    masked = torch.rand(10_000, VOCAB, generator=g) < 0.5
    logits[masked] = float("-inf")
    probs = logits.softmax(-1)
    for _ in range(20):
        ids = sample_rows(probs)
        assert not bool(masked[torch.arange(10_000), ids].any())


@pytest.fixture(scope="module")
def tiny():
    from grpo.models.tiny import build_random_qwen3
    from grpo.models.tiny_data import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    return build_random_qwen3(tok), tok


def test_decode_loop_keeps_multinomials_distribution(tiny, monkeypatch):
    """Through generate's decode loop (temperature 0.7, top-p 0.9, so the filtering path runs): the first
    response token of 4,096 rows and the response lengths, ours against the same loop drawing with
    torch.multinomial."""
    model, tok = tiny
    prompts = [tok.encode("12 + 7 = ")] * 64

    def draw(seed):
        torch.manual_seed(seed)
        return generate_mod.generate(model, tok, prompts, n=64, max_new_tokens=6, temperature=0.7, top_p=0.9)

    ours = draw(0)
    monkeypatch.setattr(generate_mod, "sample_rows", _multinomial)
    theirs = draw(1)
    vocab = model.get_input_embeddings().weight.shape[0]
    first = [torch.bincount(torch.tensor([r[0] for r in b.response_ids]), minlength=vocab).double() for b in (ours, theirs)]
    pooled = (first[0] + first[1]) / (2 * first[0].sum())
    assert _homogeneity(first[0], first[1], pooled) > 1e-3
    lengths = [torch.bincount(torch.tensor(b.response_lengths), minlength=7).double() for b in (ours, theirs)]
    assert _homogeneity(lengths[0], lengths[1], (lengths[0] + lengths[1]) / (2 * lengths[0].sum())) > 1e-3
