"""Evaluation: metrics (a leaf module objectives may use), probes, embeddings, pictures."""
