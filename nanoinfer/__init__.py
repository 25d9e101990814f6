"""nanoinfer: a from-scratch LLM inference engine.

>>> from nanoinfer import LLM, SamplingParams
>>> llm = LLM("smollm2-135m-instruct")
>>> print(llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32)).text)
"""

from nanoinfer.outputs import CompletionOutput, RequestOutput
from nanoinfer.sampling_params import SamplingParams, StructuredOutputsParams


def __getattr__(name: str):
    # LLM pulls in torch and the engine; keep `import nanoinfer` light for the CLI's --help.
    if name == "LLM":
        from nanoinfer.llm import LLM

        return LLM
    if name == "LoRARequest":
        from nanoinfer.adapters.serving import LoRARequest

        return LoRARequest
    raise AttributeError(name)


__all__ = ["LLM", "LoRARequest", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
