"""The synthetic language-modelling task of the natural-galore / galore reproductions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.galore.experiment import allocate
from experiments.natural_galore import lm


def test_loss_floor_is_the_expected_loss_of_the_true_conditional():
    task = lm.Task(vocab=8, support=3, concentration=0.5, seq_len=12)
    chain = lm.make_chain(task, 0)
    np.testing.assert_allclose(chain.sum(-1), 1.0, atol=1e-12)
    assert np.all((chain > 0).sum(-1) <= task.support)
    seqs = np.asarray(lm.sample(task, chain, 4000, np.random.default_rng(1)))
    # negative log-likelihood of each next token under the exact conditional
    nll = -np.log(chain[seqs[:, :-2], seqs[:, 1:-1], seqs[:, 2:]])
    per_seq = (np.log(task.vocab) + nll.sum(1)) / task.seq_len  # position 0: uniform start
    se = per_seq.std(ddof=1) / np.sqrt(len(per_seq))
    assert abs(per_seq.mean() - lm.loss_floor(chain, task.seq_len)) < 4 * se


def test_first_order_floor_bounds_and_equality_without_second_order_structure():
    task = lm.Task(vocab=6, support=2, seq_len=10)
    chain = lm.make_chain(task, 3)
    h1, h2 = lm.first_order_floor(chain, 10), lm.loss_floor(chain, 10)
    assert h2 < h1 < np.log(6)
    flat = np.broadcast_to(chain[:1], chain.shape)  # the next token ignores the older one
    np.testing.assert_allclose(lm.first_order_floor(flat, 10), lm.loss_floor(flat, 10),
                               rtol=1e-12)


@pytest.mark.slow  # compiles the sampler's scan
def test_jitted_sampler_only_takes_transitions_of_the_chain():
    task = lm.Task(vocab=8, support=2, seq_len=16)
    chain = lm.make_chain(task, 2)
    seqs = np.asarray(jax.jit(lm.sampler(task, jnp.asarray(chain, jnp.float32), 64))(
        jax.random.key(0)))
    assert seqs.shape == (64, 17)
    assert np.all(chain[seqs[:, :-2], seqs[:, 1:-1], seqs[:, 2:]] > 0)


def test_welore_allocation_fits_the_uniform_budget_and_follows_the_spectra():
    shapes = {"a": (8, 8), "b": (8, 8), "c": (8, 16)}
    spectra = {"a": 2.0 ** -np.arange(8.0),            # fast decay: few directions matter
               "b": np.linspace(1.0, 0.5, 8),          # flat
               "c": np.linspace(1.0, 0.3, 8)}
    out = allocate(spectra, shapes, keep=0.5)
    cost = {k: sum(out[k][m] * sum(shapes[m]) for m in shapes) for k in ("uniform", "welore")}
    assert len(set(out["uniform"].values())) == 1
    assert cost["welore"] <= cost["uniform"]
    assert out["welore"]["a"] < out["welore"]["b"]
    # the threshold is the smallest that fits: the next normalised value down does not
    values = np.unique(np.concatenate([s / s[0] for s in spectra.values()]))
    lower = values[values < out["threshold"]].max()
    more = sum(max(1, int(np.sum(spectra[m] / spectra[m][0] >= lower))) * sum(shapes[m])
               for m in shapes)
    assert more > cost["uniform"]
