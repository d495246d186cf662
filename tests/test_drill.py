"""``verify --restore-drill``: training resumes from the secondary, bit for bit; failures are named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.conftest import cli, write_config
from tests.daemon_helpers import DaemonProcess, latest_manifest, set_names, wait_until
from tests.helpers import checkpoint_source, config_dict, make_checkpoint


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


def train_step(model: TinyNet, opt: torch.optim.Optimizer) -> torch.Tensor:
    """One step on a batch drawn from the global RNG (so the RNG state must be restored too)."""
    x = torch.randn(32, 8)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    return loss.detach()


def new_trainer() -> tuple[TinyNet, torch.optim.Optimizer]:
    model = TinyNet()
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def save_checkpoint(root: Path, step: int, model: TinyNet, opt: torch.optim.Optimizer) -> None:
    d = root / f"step-{step:06d}"
    d.mkdir()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "rng": torch.get_rng_state()}
    torch.save({**state, "step": step}, d / "checkpoint.pt")
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    (d / "COMPLETE").write_text("")  # the marker, written last: the set is complete


def drill(target: Path, scratch: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    res = cli("verify", "--repo", str(target), "--restore-drill", "--scratch", str(scratch), "--json", *extra)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)[0]["drill"], res.stderr


def test_training_resumes_from_the_secondary_with_the_exact_next_step_loss(tmp_path: Path) -> None:
    torch.use_deterministic_algorithms(True)
    primary, target, scratch = tmp_path / "primary", tmp_path / "secondary", tmp_path / "scratch"
    primary.mkdir()
    target.mkdir()
    targets = [{"name": "dr", "url": str(target)}]
    cfg = write_config(tmp_path / "r.yaml", config_dict(tmp_path, [checkpoint_source(primary)], targets))
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    try:
        wait_until(daemon.ready, what="daemon ready")
        torch.manual_seed(1234)
        model, opt = new_trainer()
        for step in (1, 2, 3):
            train_step(model, opt)
            save_checkpoint(primary, step, model, opt)
        wait_until(
            lambda: "step-000003" in set_names(latest_manifest({"name": "dr", "url": str(target)}, "ckpt")),
            what="step 3 replicated",
        )
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    uninterrupted = train_step(model, opt)  # step 4 of the run that never failed over

    code, report, err = drill(target, scratch, "--load")
    assert code == 0, err
    (src,) = report["sources"]
    assert report["ok"] and src["ok"] and src["kind"] == "checkpoint"
    assert src["newest_restorable_set"] == "step-000003" and src["sets"] == 3
    assert src["files"] == 9 and src["restored_files"] == 9 and src["bytes"] > 0
    assert src["formats"] == {"torch-zip": 3, "json": 3} and src["loaded"] == 3
    assert src["digest_failures"] == {} and src["format_failures"] == {} and src["problems"] == []
    assert src["throughput_bytes_per_second"] > 0 and src["rto_seconds"] > 0
    assert 0 <= src["age_seconds"] < 600

    # The 'secondary' site: a fresh process state, only the restored checkpoint.
    restored = Path(src["restored_to"]) / "step-000003" / "checkpoint.pt"
    assert restored.is_relative_to(scratch)
    state = torch.load(restored, weights_only=True)
    torch.manual_seed(999)  # whatever the new site's RNG was, the checkpoint decides
    resumed_model, resumed_opt = new_trainer()
    resumed_model.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optim"])
    torch.set_rng_state(state["rng"])
    resumed = train_step(resumed_model, resumed_opt)
    assert state["step"] == 3
    assert torch.equal(resumed, uninterrupted), f"{resumed.item()!r} != {uninterrupted.item()!r}"
    for a, b in zip(resumed_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)

    # Run again into the same scratch: files already correct are digest-checked, not fetched.
    again = cli("verify", "--repo", str(target), "--restore-drill", "--scratch", str(scratch))
    assert again.returncode == 0, again.stderr
    assert "restore drill: PASS" in again.stdout
    assert "(9 already present)" in again.stdout
    assert "newest restorable checkpoint set: step-000003" in again.stdout


def test_drill_names_digest_and_format_failures_and_falls_back_to_an_older_set(tmp_path: Path) -> None:
    primary, target = tmp_path / "primary", tmp_path / "target"
    target.mkdir()
    make_checkpoint(primary, 1, hidden=64)
    make_checkpoint(primary, 2, hidden=64)
    shard = primary / "step-000002" / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # replicates perfectly; useless all the same
    (primary / "notes.json").write_text("{not json")
    targets = [{"name": "t", "url": str(target)}]
    cfg = write_config(tmp_path / "r.yaml", config_dict(tmp_path, [checkpoint_source(primary)], targets))
    assert cli("sync", "-c", str(cfg)).returncode == 0

    code, report, _ = drill(target, tmp_path / "scratch")
    assert code == 1 and not report["ok"]
    (src,) = report["sources"]
    assert set(src["format_failures"]) == {"step-000002/model-00001-of-00002.safetensors", "notes.json"}
    assert "tensors cover" in src["format_failures"]["step-000002/model-00001-of-00002.safetensors"]
    assert src["newest_restorable_set"] == "step-000001"

    # A chunk lost on the target: a digest failure, named, and that set no longer counts either.
    human = cli("verify", "--repo", str(target), "--restore-drill")
    assert "FORMAT FAILED notes.json: json: not valid JSON" in human.stdout
    for chunk in [*(target / "chunks").rglob("*"), *(target / "packs").rglob("*")]:
        if chunk.is_file():
            chunk.unlink()
    code, report, _ = drill(target, tmp_path / "scratch2")
    (src,) = report["sources"]
    assert code == 1 and len(src["digest_failures"]) == 7  # every file but the two empty markers
    assert src["newest_restorable_set"] is None
    assert any("training cannot resume" in p for p in src["problems"])


def test_drill_exit_codes(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    usage = cli("verify", "--repo", str(target), "--load")
    assert usage.returncode == 2 and "--load need" in usage.stderr
    usage = cli("verify", "--repo", str(target), "--scratch", str(tmp_path))
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1
    dead = {"name": "dead", "url": "s3://bucket/replica", "endpoint_url": "http://127.0.0.1:9"}
    cfg = write_config(tmp_path / "r.yaml", config_dict(tmp_path, [], [dead]))
    down = cli("verify", "-c", str(cfg), "--restore-drill")
    assert down.returncode == 3, down.stderr
    last = down.stderr.strip().splitlines()[-1]  # retry warnings are logged before it
    assert last.startswith("replicator: error: target dead:") and "cannot connect" in last
