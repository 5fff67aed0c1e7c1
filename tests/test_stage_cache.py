"""Stage caching: a cell that reuses another cell's pre-training and round-1 client models gives the same
numbers to the last digit as one that computes them; any input the stage reads changes its key."""
from __future__ import annotations

import torch

from fl_core.fl import run_cell


def _metrics(record: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in record["rounds"]]


def _entries(tmp_path, kind: str = "") -> set[str]:
    return {p.name for p in (tmp_path / "cache" / "stages" / kind).glob("*.pt")}


def _run(tiny_config, tmp_path, name, extra=None, overrides=()):
    record = run_cell(tiny_config(extra, overrides), tmp_path / name, log=lambda *_: None)
    state = torch.load(tmp_path / name / "models" / "prototype0.pt", weights_only=True)
    return record, state


def _same(a, b) -> None:
    (rec_a, state_a), (rec_b, state_b) = a, b
    assert _metrics(rec_a) == _metrics(rec_b)
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_cached_stages_give_identical_results_and_are_shared_across_defenses(tiny_config, tmp_path):
    attack = {"attack": {"name": "badnets", "params": {"num_malicious": 1}}}
    plain = _run(tiny_config, tmp_path, "plain", attack, ("runtime.stage_cache=false",))
    assert not _entries(tmp_path)
    first = _run(tiny_config, tmp_path, "first", attack)
    stored = _entries(tmp_path)
    assert len(stored) == 2  # pre-trained model, round-1 client models
    teachers = _entries(tmp_path, "teachers")
    assert len(teachers) == len(first[0]["rounds"][1]["admitted"])  # round 1's teacher outputs, one per client
    again = _run(tiny_config, tmp_path, "again", attack)
    assert _entries(tmp_path, "teachers") == teachers  # reused
    assert len(_entries(tmp_path, "evaluations")) == 1  # the pre-trained model's test metrics
    _same(plain, first)
    _same(plain, again)
    assert again[0]["rounds"][1]["local_seconds"] == 0.0  # round 1 trained nothing
    # another defense (acting after the clients train) reuses both stages and still matches its own uncached run
    defended = {**attack, "defense": {"name": "normclip"}}
    cached = _run(tiny_config, tmp_path, "normclip", defended)
    assert _entries(tmp_path) == stored
    assert _entries(tmp_path, "teachers") > teachers  # the clipped clients' outputs are new teacher outputs
    _same(cached, _run(tiny_config, tmp_path, "normclip-plain", defended, ("runtime.stage_cache=false",)))


def test_changing_an_input_of_a_stage_misses_the_cache(tiny_config, tmp_path):
    _run(tiny_config, tmp_path, "base")
    base = _entries(tmp_path)
    _run(tiny_config, tmp_path, "client-lr", overrides=("fl.client.lr=0.002",))  # same pre-training, new round 1
    after_client = _entries(tmp_path)
    assert len(after_client - base) == 1
    _run(tiny_config, tmp_path, "pretrain-lr", overrides=("pretrain.optim.lr=0.001",))  # both stages new
    assert len(_entries(tmp_path) - after_client) == 2
    before = _entries(tmp_path)
    _run(tiny_config, tmp_path, "poisoned", {"attack": {"name": "fm"}})  # poisoned synthetic set: new pre-training
    assert len(_entries(tmp_path) - before) == 2


def test_another_cpu_model_misses_the_cache(tiny_config, tmp_path, monkeypatch):
    import fl_core.stages

    _run(tiny_config, tmp_path, "here")
    before = _entries(tmp_path)
    monkeypatch.setattr(fl_core.stages, "cpu_model", lambda: "another CPU")  # its kernels change the last digits
    _run(tiny_config, tmp_path, "there")
    assert len(_entries(tmp_path) - before) == 2


def test_round_1_is_shared_only_while_the_defense_leaves_the_broadcast_alone(tiny_config, tmp_path):
    from defenses import DEFENSES
    from fl_core.hooks import Defense

    class Shifting(Defense):
        """Perturbs the broadcast model: its clients train from other weights."""

        def before_round(self, global_model, prototype, ctx):
            with torch.no_grad():
                next(global_model.parameters()).add_(0.01)

    DEFENSES._entries["test-shifting"] = Shifting
    try:
        _run(tiny_config, tmp_path, "base")
        _run(tiny_config, tmp_path, "shifting", {"defense": {"name": "test-shifting"}})
        assert len(_entries(tmp_path)) == 2  # only the base cell's two entries
        # the paper's defense clamps the clients only once it has bounds: round 1 is shared
        assert not DEFENSES.get("actbound")().changes_broadcast(1)
        _run(tiny_config, tmp_path, "actbound", {"defense": {"name": "actbound"}})
        assert len(_entries(tmp_path)) == 2
    finally:
        del DEFENSES._entries["test-shifting"]


def test_a_stage_file_is_trusted_only_whole(tmp_path, capsys):
    from fl_core.stages import StageCache

    cache = StageCache(tmp_path)
    cache.save("k1", {"models": [{"w": torch.ones(2)}]})
    assert torch.equal(cache.load("k1")["models"][0]["w"], torch.ones(2))
    blob = torch.load(tmp_path / "k1.pt", weights_only=True)
    blob["blob"]["models"] = []  # an empty model list: the content no longer matches its hash
    torch.save(blob, tmp_path / "k1.pt")
    assert cache.load("k1") is None and "does not match its content hash" in capsys.readouterr().err
    (tmp_path / "k1.pt").rename(tmp_path / "k2.pt")  # another key's file under this name
    assert cache.load("k2") is None and "not a stage output of key k2" in capsys.readouterr().err
    torch.save({"models": []}, tmp_path / "k3.pt")  # a bare blob, as an earlier version wrote it
    assert cache.load("k3") is None
