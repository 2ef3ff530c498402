#!/usr/bin/env bash
# Issue 30 items 17-18 (ring 3 layout, one meaning per name): the mechanical moves and renames.
# Idempotent: re-run it after merging other branches, e.g. `bash scripts/dev/ring3_moves.sh`.
#  - app/startup.py, app/config_types.py -> app/checks/ (imports rewritten everywhere)
#  - cli/common.py (shared by four argparse commands) -> app/cli_args.py: cli/ is one module per
#    console script, nothing else
#  - the shared sampler checks (normalise_schedule, check_sampler, check_fid_reference) move from
#    app/checks/train.py into app/checks/sampler.py (re-extracted from train.py whenever present)
#  - eval.fid_at_n.sample_set (function) -> draw_set; the module sampling/sample_set.py stays
#  - model.checkpoint.load_model -> build_from_checkpoint;
#    cli.common.load_model -> app.cli_args.model_from_args
#  - data/prepare.py's "plan" (the manifest before completion) -> "draft", as the encoder calls
#    it; the PLAN constants (data/prepared.py, data/latents.py) -> DRAFT; on disk still plan.json
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

move() {  # move OLD NEW: git mv, or (after a merge brought OLD back) OLD's content wins into NEW
  local old=$1 new=$2
  if [ -e "$old" ]; then
    if [ -e "$new" ]; then cp "$old" "$new"; git rm -q -f "$old"; git add "$new"
    else git mv "$old" "$new"; fi
  fi
}
move tarflow/app/startup.py tarflow/app/checks/startup.py
move tarflow/app/config_types.py tarflow/app/checks/config_types.py
move tarflow/cli/common.py tarflow/app/cli_args.py

python - <<'PY'
import re
import subprocess
from pathlib import Path

SAMPLER = ("normalise_schedule", "check_sampler", "check_fid_reference")
train = Path("tarflow/app/checks/train.py")
sampler = Path("tarflow/app/checks/sampler.py")
text = train.read_text()
start = text.find("# " + "-" * 77 + " samplers\n")
end = text.find("# " + "-" * 77 + " checkpoints\n")
if start != -1 and end != -1:  # (re)extract the block: train.py's version is the newest
    block = text[start:end].split("\n", 1)[1].strip("\n")
    head = '''"""Start-up checks of a sampler config and of FID reference statistics, shared by
``tarflow-train`` (its sampling callback; :mod:`tarflow.app.checks.train`), ``tarflow-sample``
and ``tarflow-eval`` (:mod:`tarflow.app.checks.sample`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tarflow.eval import FeatureStats, load_reference, reference_format
from tarflow.eval.inception import FEATURE_DIM
from tarflow.model import TarFlowConfig
from tarflow.sampling.settings import parse_sampler


'''
    sampler.write_text(head + block + "\n")
    text = text[:start] + text[end:]
    imp = "from tarflow.app.checks.sampler import " + ", ".join(sorted(SAMPLER)) + "\n"
    if imp not in text:
        text = text.replace("from tarflow.app.checks.paths import",
                            imp + "from tarflow.app.checks.paths import", 1)
    text = text.replace(
        "The sampler and checkpoint helpers here are shared with ``tarflow-sample`` and "
        "``tarflow-eval``\n(:mod:`tarflow.app.checks.sample`).",
        "The sampler checks shared with ``tarflow-sample`` and ``tarflow-eval`` live in\n"
        ":mod:`tarflow.app.checks.sampler`.")
    train.write_text(text)
    subprocess.run(["ruff", "check", "-q", "--select", "F401,I001", "--fix", str(train),
                    str(sampler)], check=False)

files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.sh", "*.yaml", "*.toml", "*.cfg"],
                       capture_output=True, text=True, check=True).stdout.split()
files = [f for f in files if f != "scripts/dev/ring3_moves.sh" and Path(f).is_file()]

changed = []
imp_train = re.compile(r"^(\s*)from tarflow\.app\.checks\.train import ([\w, ]+)$", re.M)


def split_train_import(m: re.Match) -> str:
    names = [n.strip() for n in m.group(2).split(",") if n.strip()]
    ours = [n for n in names if n in SAMPLER]
    rest = [n for n in names if n not in SAMPLER]
    out = []
    if ours:
        out.append(f"{m.group(1)}from tarflow.app.checks.sampler import {', '.join(ours)}")
    if rest:
        out.append(f"{m.group(1)}from tarflow.app.checks.train import {', '.join(rest)}")
    return "\n".join(out)


for f in files:
    p = Path(f)
    old = p.read_text()
    t = old
    # app/startup.py, app/config_types.py -> app/checks/
    t = re.sub(r"\bapp([./])(startup|config_types)\b", r"app\1checks\1\2", t)
    t = re.sub(r"\bcli([./])common\b", r"app\1cli_args", t)
    # the shared sampler checks' new home
    if f != "tarflow/app/checks/train.py":
        t = imp_train.sub(split_train_import, t)
        t = re.sub(r"checks\.train\.(" + "|".join(SAMPLER) + r")\b", r"checks.sampler.\1", t)
    # eval.fid_at_n.sample_set (a function) -> draw_set; sampling/sample_set.py is the module
    t = re.sub(r"^(\s*from tarflow\.eval\.fid_at_n import [^\n]*)\bsample_set\b",
               r"\1draw_set", t, flags=re.M)
    t = re.sub(r"fid_at_n\.sample_set\b", "fid_at_n.draw_set", t)
    if f.endswith(".py"):
        t = re.sub(r"(?<![\w.])sample_set\(", "draw_set(", t)
        t = t.replace(":func:`sample_set`", ":func:`draw_set`")
    # two load_model functions -> distinct names
    if f in ("tarflow/model/checkpoint.py", "tarflow/model/tarflow.py"):
        t = re.sub(r"\bload_model\b", "build_from_checkpoint", t)
    t = re.sub(r"(from tarflow\.app\.cli_args import [^\n]*)\bload_model\b", r"\1model_from_args", t)
    if (f.startswith("tarflow/cli/") or f == "tarflow/app/cli_args.py"
            or "from tarflow.app.cli_args import" in t):
        t = re.sub(r"\bload_model\(", "model_from_args(", t)
    # data/prepare.py's "plan" (the manifest before completion) -> its draft, the encoder's word
    # (app/checks/encode.py manifest_draft); the planner alone keeps "plan"; on disk still plan.json
    if f in ("tarflow/data/prepare.py", "tarflow/cli/prepare.py", "tests/unit/test_prepared.py"):
        t = re.sub(r"\bon_plan\b", "on_draft", t)
    if f in ("tarflow/data/prepare.py", "tarflow/cli/prepare.py", "tarflow/data/prepared.py"):
        t = re.sub(r"\b_plan\(", "_draft(", t)
        t = re.sub(r"\bplan_\b", "draft_", t)
        t = re.sub(r"(?<![\w\"'.])plan\b(?!\.json)", "draft", t)
        t = t.replace(
            '        return Path(str(theirs.get("source_root"))).resolve() == '
            'Path(draft["source_root"]).resolve()\n',
            '        theirs_root = Path(str(theirs.get("source_root"))).resolve()\n'
            '        return theirs_root == Path(draft["source_root"]).resolve()\n')
    if f in ("tarflow/data/prepared.py", "tarflow/data/latents.py") or re.search(
            r"from tarflow\.data\.(latents|prepared) import", t):
        t = re.sub(r"\bPLAN\b", "DRAFT", t)
    if t != old:
        p.write_text(t)
        changed.append(f)
py = [f for f in changed if f.endswith(".py")]
if py:  # re-sort the import blocks the renames touched
    subprocess.run(["ruff", "check", "-q", "--select", "I001", "--fix", *py], check=False)
PY
git add -A tarflow tests scripts docs README.md
