"""The worked examples of docs/architecture.md run as written: a data source, a transfer loss and a range setter,
each one file and one registration line, train through the job API and get their own CLI flags."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zsq.cli import build_parser
from zsq.distill import LOSSES
from zsq.errors import UserError
from zsq.flags import quantize_config_from
from zsq.quant import act_quantizers
from zsq.quant.ranges import RANGE_SETTERS
from zsq.synth import SOURCES
from zsq.train import build_job, resolve_config

from conftest import PROBE_KW

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


@pytest.fixture
def doc_plugins():
    """The doc's examples registered for one test and removed after it: other tests enumerate the registries."""
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S):
        exec(compile(block, str(DOC), "exec", dont_inherit=True), {"__name__": "architecture_doc"})
    yield
    for registry, name in ((SOURCES, "noise"), (LOSSES, "logit-mse"), (RANGE_SETTERS, "ema-shrink")):
        del registry._entries[name], registry._options[name]  # no public unregister: plug-ins stay for a process


def test_the_architecture_doc_examples_train_and_get_their_flags(doc_plugins, tiny_teacher, fmnist_dir, tmp_path):
    cfg = resolve_config("quick", "noise", "logit-mse", teacher=str(tiny_teacher), data_dir=str(fmnist_dir),
                         epochs=2, iters_per_epoch=2, warmup_epochs=1, batch_size=4, act_range="ema-shrink",
                         noise_std=0.5, mse_weight=2.0, range_shrink=0.5, out=str(tmp_path / "run"), **PROBE_KW)
    assert cfg.options == {"noise_std": 0.5, "mse_weight": 2.0, "range_shrink": 0.5}
    job = build_job(cfg)
    try:
        job.start_epoch(0)
        job.iterate(True)  # warm-up: a GDFQ generator calibrates the ranges, as for any offline source
        observed = [q.hi.item() for q in act_quantizers(job.qmodel)]
        job.set_ranges()  # what the loop does when the warm-up ends
        assert [q.hi.item() for q in act_quantizers(job.qmodel)] == pytest.approx([0.5 * h for h in observed])
        job.start_epoch(1)
        terms, skipped = job.iterate(False)
    finally:
        job.close()
    assert not any(skipped.values()) and terms["loss_q"] == pytest.approx(2.0 * terms["mse"].item())
    args = build_parser().parse_args(["quantize", "--source", "noise", "--loss", "logit-mse", "--act-range",
                                      "ema-shrink", "--noise-std", "0.25", "--out", str(tmp_path / "cli")])
    assert quantize_config_from(args).options == {"noise_std": 0.25, "range_shrink": 0.9}  # the setter's default
    for option, taker in (("noise_std", "--source noise"), ("range_shrink", "--act-range ema-shrink")):
        with pytest.raises(UserError, match=f"--{option.replace('_', '-')} does not apply to this run: it applies "
                                            f"to {taker}"):
            resolve_config("quick", "gdfq", "kd", **{option: 0.5})


def test_the_cli_reference_is_generated_from_the_parsers_and_registries():
    """docs/cli.md is what `python -m zsq.clidoc` writes now: a flag, a choice or a plug-in added without
    regenerating it fails here. In a process of its own: tests register plug-ins of their own in theirs."""
    page = DOC.with_name("cli.md")
    now = subprocess.run([sys.executable, "-m", "zsq.clidoc"], capture_output=True, text=True, check=True).stdout
    assert page.read_text() == now, "regenerate it: python -m zsq.clidoc > docs/cli.md"
    for needle in ("## zsq quantize", "`--source`", "`--act-range`", "| `kd+ce` |", "| `bn-prior` |",
                   "`adadfq` → `gap-entropy`", "## zsq teacher train"):
        assert needle in page.read_text(), needle


ROOT = DOC.parents[1]
SECTION = re.compile(r"<!-- zsq (report|headline): (\S+) -->\n(.*?)<!-- /zsq \1: \2 -->", re.S)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_generated_sections_match_their_stores(doc):
    """Each `<!-- zsq report: NAME -->` (or `headline`) section is what `zsq report --store results/NAME --readme
    DOC` writes from the committed store: a grid's new runs, or a change to the report, fail here until the section
    is regenerated."""
    from zsq.bench.report import store_section

    for kind, name, body in SECTION.findall(doc.read_text()):
        store = ROOT / "results" / name
        assert (store / "results.db").is_file(), f"{doc.name}: section {name} has no store {store}"
        assert body == store_section(store, kind), \
            f"regenerate it: zsq report --store results/{name} --readme {doc.name}"


def test_the_teacher_tables_quote_the_recorded_numbers():
    """README's accuracy rows of each shipped teacher are results/teachers.json's (python benchmarks/teachers.py),
    whose numbers tests/test_shipped_teacher.py binds to the shipped weight files."""
    record = json.loads((ROOT / "results" / "teachers.json").read_text())
    readme = (ROOT / "README.md").read_text()
    for name, row in record["teachers"].items():
        table = readme.split(f" teacher `{name}`\n", 1)[1]  # the teacher's own heading, then its table
        for key, label in (("fp", "FP top-1 / top-5"), ("w8a8", "W8A8 fake-quant"), ("w4a4", "W4A4 fake-quant")):
            cells = f"{row[key]['top1']:.2f} / {row[key]['top5']:.2f}"
            quoted = re.search(rf"^\| {label}[^|]*\| ([^|]*) \|", table, re.M)
            assert quoted and quoted.group(1) == cells, f"{name} {key}: README {quoted and quoted.group(1)}, recorded {cells}"


def test_the_study_index_quotes_each_pages_result_sentence():
    """docs/results/README.md lists every study page with the page's own **Result.** sentence: a page whose result
    changed fails here until the index says the same."""
    results = ROOT / "docs" / "results"
    index = (results / "README.md").read_text()
    listed = re.findall(r"^- \[.*?\]\((\S+?\.md)\): (.*?)(?=^- |\Z)", index, re.M | re.S)
    assert sorted(page for page, _ in listed) == sorted(p.name for p in results.glob("*.md") if p.name != "README.md")
    for page, sentence in listed:
        said = re.search(r"\*\*Result\.\*\* (.*?)\n\n", (results / page).read_text(), re.S)
        assert said and " ".join(sentence.split()) == " ".join(said.group(1).split()), f"{page}: copy its result"
