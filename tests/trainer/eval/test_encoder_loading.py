"""Encoders from checkpoints: export / teacher / student, head handling, the random baseline."""

from __future__ import annotations

import pytest
import torch

from trainer.engine.checkpoint import CheckpointError, load_checkpoint
from trainer.eval.encoder_loading import load_encoder, random_baseline


def _same(model: torch.nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], state[k]) for k in own)


def test_ssl_checkpoint_gives_teacher_by_default_and_student_on_request(ssl_ckpt) -> None:
    payload = load_checkpoint(ssl_ckpt)
    exported = load_encoder(str(ssl_ckpt))
    assert exported.source == "teacher" and _same(exported.encoder, payload["model"])
    assert not exported.encoder.training and exported.encoder.head is None
    assert _same(load_encoder(payload, which="teacher").encoder, payload["model"])
    student = load_encoder(payload, which="student")
    assert student.source == "student" and _same(student.encoder, payload["student"])
    with pytest.raises(CheckpointError, match="no classification head"):
        load_encoder(payload, with_head=True)


def test_supervised_checkpoint_drops_the_head_for_embedding(supervised_ckpt) -> None:
    payload = load_checkpoint(supervised_ckpt)
    loaded = load_encoder(payload)
    assert loaded.source == "encoder" and loaded.encoder.head is None and loaded.label_map == {"blue": 0, "red": 1}
    body = {k: v for k, v in payload["model"].items() if not k.startswith("head.")}
    assert _same(loaded.encoder, body)
    assert load_encoder(payload, which="student").source == "encoder"  # one encoder: it is the student
    with pytest.raises(CheckpointError, match="has no teacher"):
        load_encoder(payload, which="teacher")
    classifier = load_encoder(payload, with_head=True)
    assert classifier.num_classes == 2 and _same(classifier.encoder, payload["model"])


def test_missing_weights_and_unknown_variant_are_refused(supervised_ckpt) -> None:
    payload = load_checkpoint(supervised_ckpt)
    broken = {**payload, "model": {k: v for k, v in payload["model"].items() if not k.startswith("norm.")}}
    with pytest.raises(CheckpointError, match="lack 1 key"):
        load_encoder(broken)
    with pytest.raises(CheckpointError, match="unknown model"):
        load_encoder({**payload, "model_name": "pixel_mamba_9000"})


def test_baseline_is_a_fixed_random_init_of_the_same_variant(supervised_ckpt) -> None:
    loaded = load_encoder(str(supervised_ckpt))
    state = torch.get_rng_state()
    first, second = random_baseline(loaded, seed=0), random_baseline(loaded, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert _same(first.encoder, second.encoder.state_dict()) and first.source == "random"
    assert not _same(first.encoder, loaded.encoder.state_dict())
    assert first.encoder.config == loaded.encoder.config
