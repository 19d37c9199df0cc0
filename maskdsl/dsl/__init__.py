"""The DSL stage: pattern and score nodes, per_head values, the spec parser."""
