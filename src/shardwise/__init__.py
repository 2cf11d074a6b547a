"""shardwise: sharded LLM research pipelines (generation, teacher logits, probes, analysis)."""

__version__ = "0.1.0"
