"""nanoinfer: a from-scratch LLM inference engine."""
