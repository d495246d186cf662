"""Proving a repository copy is whole and usable, and healing it.

run        `replicator verify` over the chosen targets: check each, then repair and drill
           as asked; the result per target
check      `verify`: structure, and with --read-data every chunk re-hashed and every file
           re-assembled against its digest
repair     `verify --repair`: missing or damaged chunks sent again from the sources
drill      `verify --restore-drill`: restore into scratch space and prove training resumes
formats    the drill's checks of known artifacts (safetensors, torch, DCP, NumPy, Parquet, JSON)
load       `--load`: find the restored checkpoints, load each, the verdict per checkpoint set
torch_loaders  the loads themselves (DCP, safetensors, torch.save); the only module importing torch
"""
