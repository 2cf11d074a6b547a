"""Stage `prepare_model`: materialise one configured model under resources/models/<name>/."""

from __future__ import annotations

import logging
from typing import Any

from shardwise.config import load_config
from shardwise.models import prepare_model

log = logging.getLogger(__name__)

# The stage's code identity (shardwise.fingerprint.stage_identity): bump VERSION when a change is meant
# to change results; LIBRARIES are the distributions whose installed versions compute them.
VERSION = 1
LIBRARIES = ("torch", "transformers", "gguf")


def job(smk: Any) -> None:
    cfg = load_config(smk.config)
    spec = cfg.models[smk.wildcards.model]
    record = prepare_model(spec, smk.output[0], hf_home=cfg.hf_home)
    log.info(
        "prepared %s (%s) in %.1f s: identity %s",
        spec.name,
        spec.describe(),
        record["prepare_seconds"],
        record["identity"],
    )
