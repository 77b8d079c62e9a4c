"""Selection on the validation split never reads a test score, and the runner's bookkeeping (resume,
skip, refuse changed options, split threads) with a fake launcher that writes what maskkit would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskkit.ablate import StudyError, StudyRunner, parse_study
from maskkit.ablate.select import choose
from maskkit.ablate.study import Selection

STUDY = {
    "study": {"data": "digits", "seeds": [0, 1, 2], "steps": 30, "baseline": "random", "options": {"model": "micro"}},
    "evaluations": {"linear": {"epochs": 5}},
    "arms": {
        "random": {"options": {"policy": "random"}},
        "mlo": {"options": ["--policy", "learned", "--learned-selection", "gumbel"],
                "select": {"option": "masker-lr", "values": [1e-3, 1e-4, 1e-5], "by": "linear", "seeds": [0, 1]}},
    },
}  # fmt: skip


class ReadTestScore(AssertionError):
    """Raised by the fake evaluator when anything asks for a test score during selection."""


def test_choose_asks_for_validation_scores_only_and_takes_the_best_mean():
    asked = []

    def score(value: str, seed: int, split: str) -> float:
        asked.append((value, seed, split))
        if split != "val":
            raise ReadTestScore(f"selection read a {split} score")
        return {"a": 0.5, "b": 0.7, "c": 0.6}[value] + 0.01 * seed

    choice = choose(Selection("--x", ("a", "b", "c"), "linear", (0, 1)), score)
    assert choice.chosen == "b"
    assert {split for _, _, split in asked} == {"val"} and len(asked) == 6
    assert choice.scores["b"] == {0: 0.7, 1: 0.71}


def test_ties_go_to_the_value_listed_first():
    choice = choose(Selection("--x", ("p", "q"), "linear", (0,)), lambda v, s, split: 0.5)
    assert choice.chosen == "p"


class FakeMaskkit:
    """A launcher that makes run directories as `maskkit pretrain` / `evaluate` would, with fixed scores.

    Validation scores favour --masker-lr 0.0001, test scores favour 0.001: a selection that peeked
    at test would choose 0.001. During selection (`selecting`), any test evaluation raises.
    """

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.selecting = True
        self.fail_on: str | None = None

    def __call__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.calls.append(args)
        if args[0] == "pretrain":
            out = Path(args[args.index("--resume") + 1] if "--resume" in args else args[args.index("--out") + 1])
            if self.fail_on and self.fail_on in str(out):
                from maskkit.ablate import RunFailed

                raise RunFailed(f"maskkit pretrain failed (Error: boom); see {log}")
            out.mkdir(parents=True, exist_ok=True)
            lr = args[args.index("--masker-lr") + 1] if "--masker-lr" in args else "-"
            (out / "lr").write_text(lr) if "--resume" not in args else None
            (out / "model.pt").write_bytes(b"weights")
            (out / "summary.json").write_text(json.dumps({"steps": 30, "seconds": 1.0, "final": {"loss": 0.5}}))
        else:
            out, split = Path(args[1]), args[args.index("--split") + 1]
            if split == "test" and self.selecting:
                raise AssertionError("a test evaluation ran during selection")
            lr = (out / "lr").read_text()
            val = {"0.001": 0.60, "0.0001": 0.80, "1e-05": 0.70}.get(lr, 0.5)
            test = {"0.001": 0.90, "0.0001": 0.65, "1e-05": 0.60}.get(lr, 0.5)
            key = "linear" if split == "test" else "linear@val"
            path = out / "eval.json"
            data = json.loads(path.read_text()) if path.is_file() else {}
            data[key] = {"top1": test if split == "test" else val}
            path.write_text(json.dumps(data))


def test_the_runner_chooses_on_val_before_any_test_score_exists(tmp_path):
    fake = FakeMaskkit()
    runner = StudyRunner(parse_study(STUDY), tmp_path / "d", launch=fake, threads=1)
    choices = runner.select()
    evaluations = [c for c in fake.calls if c[0] == "evaluate"]
    assert evaluations and all(c[c.index("--split") + 1] == "val" for c in evaluations)
    assert choices["mlo"].chosen == "0.0001"  # val's best; test's best would be 0.001
    assert json.loads((tmp_path / "d" / "selection.json").read_text())["mlo"]["chosen"] == "0.0001"
    fake.selecting = False
    fake.calls.clear()
    runner.run()
    test_runs = {c[1].split("/")[-1] for c in fake.calls if c[0] == "evaluate"}
    assert {n for n in test_runs if n.startswith("mlo")} == {f"mlo@masker-lr=0.0001-s{s}" for s in (0, 1, 2)}
    pretrained = [c[c.index("--out") + 1].split("/")[-1] for c in fake.calls if c[0] == "pretrain"]
    assert pretrained == ["random-s0", "random-s1", "random-s2", "mlo@masker-lr=0.0001-s2"]  # seed by seed
    assert "mlo@masker-lr=0.0001-s0" not in pretrained  # the selection's run is reused, not made again


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(tmp_path):
    fake = FakeMaskkit()
    fake.selecting = False
    study = parse_study({**STUDY, "arms": {"random": STUDY["arms"]["random"]}})
    runner = StudyRunner(study, tmp_path / "d", launch=fake, threads=1)
    half = tmp_path / "d" / "runs" / "random-s1"
    (half / "checkpoints").mkdir(parents=True)
    (half / "checkpoints" / "checkpoint-0000010.pt").write_bytes(b"x")
    (half / "config.json").write_text(json.dumps({"train": {"steps": 30}}))
    (half / "lr").write_text("-")
    ended = tmp_path / "d" / "runs" / "random-s2"  # stopped after its last checkpoint, before model.pt
    (ended / "checkpoints").mkdir(parents=True)
    (ended / "checkpoints" / "checkpoint-0000030.pt").write_bytes(b"x")
    (ended / "config.json").write_text(json.dumps({"train": {"steps": 30}}))
    runner.run()
    pretrains = [c for c in fake.calls if c[0] == "pretrain"]
    assert ["pretrain", "--resume", str(half), "--no-progress"] in pretrains
    assert [c[c.index("--out") + 1] for c in pretrains if "--out" in c] == [
        str(tmp_path / "d" / "runs" / "random-s0"), str(ended)]  # the ended one starts over
    assert len(pretrains) == 3
    fake.calls.clear()
    runner.run()
    assert fake.calls == []  # everything done: nothing runs again
    assert all(line.startswith("# done: ") for line in runner.dry_run())


def test_a_run_made_with_other_options_is_refused(tmp_path):
    fake = FakeMaskkit()
    fake.selecting = False
    one = {**STUDY, "arms": {"random": STUDY["arms"]["random"]}}
    StudyRunner(parse_study(one), tmp_path / "d", launch=fake, threads=1).run()
    changed = {**one, "arms": {"random": {"options": {"policy": "random", "batch-size": 16}}}}
    with pytest.raises(StudyError, match="made with other options"):
        StudyRunner(parse_study(changed), tmp_path / "d", launch=fake, threads=1).run()


def test_a_failed_run_is_named_and_the_others_still_run(tmp_path):
    from maskkit.ablate import RunFailed

    fake = FakeMaskkit()
    fake.selecting, fake.fail_on = False, "random-s1"
    one = {**STUDY, "arms": {"random": STUDY["arms"]["random"]}}
    with pytest.raises(RunFailed, match="boom"):
        StudyRunner(parse_study(one), tmp_path / "d", launch=fake, threads=1, jobs=2).run()
    assert (tmp_path / "d" / "runs" / "random-s2" / "eval.json").is_file()


def test_jobs_split_the_threads():
    runner = StudyRunner(parse_study(STUDY), Path("unused"), jobs=2)
    import os

    assert runner.threads == max(1, (os.cpu_count() or 1) // 2)
    assert runner.env()["OMP_NUM_THREADS"] == str(runner.threads)
    with pytest.raises(StudyError, match="--jobs"):
        StudyRunner(parse_study(STUDY), Path("unused"), jobs=0)
