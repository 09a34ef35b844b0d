# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 — A tour of the experiment harness
#
# Every reproduction in `experiments/` is a program with a seeded config, a step
# function, orbax checkpoints and a report. This notebook runs the harness's demo
# experiment (least squares by gradient descent) the way `make reproduce-demo` does,
# interrupts it, resumes it, and shows that the resumed run ends exactly where an
# uninterrupted one does.

# %%
import json, pathlib, tempfile
from experiments import harness

exp = harness.get_experiment("demo")
cfg = harness.make_config(exp, "quick", {"steps": "12"})
cfg

# %% [markdown]
# A clean interruption after 5 steps keeps the checkpoints; the next call resumes from them.

# %%
root = pathlib.Path(tempfile.mkdtemp())
assert harness.run_experiment(exp, cfg, "quick", root, progress=False, stop_after=5) is None
resumed = harness.run_experiment(exp, cfg, "quick", root, progress=False)
print("resumed from step", resumed.resumed_from)

straight = harness.run_experiment(exp, cfg, "quick", pathlib.Path(tempfile.mkdtemp()), progress=False)
assert resumed.results == straight.results
resumed.results

# %% [markdown]
# The report is markdown with a plot, collected by `make reproduce` into `results/REPORT.md`.

# %%
from IPython.display import Image, Markdown, display
display(Markdown((resumed.outdir / "report.md").read_text().split("![")[0]))
display(Image(filename=str(resumed.outdir / "convergence.png")))
