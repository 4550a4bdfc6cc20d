"""Hugging Face's view of a prompt, for tests/test_trainer.py: token ids and logits, base or base + PEFT adapter.

Run as a script (python tests/hf_reference.py HF_DIR ADAPTER_DIR|- TEXT) so transformers' and peft's warnings
stay out of the test process; prints {"ids": [...], "base_logits": [[...], ...], "logits": (with the adapter)}.
"""

from __future__ import annotations

import json
import os
import sys
import warnings


def main(hf_dir: str, adapter_dir: str, text: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("ignore")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    answer: dict[str, object] = {"ids": ids}
    with torch.no_grad():
        answer["base_logits"] = model(torch.tensor([ids])).logits[0].tolist()
        if adapter_dir != "-":
            from peft import PeftModel

            tuned = PeftModel.from_pretrained(model, adapter_dir).eval()
            answer["logits"] = tuned(torch.tensor([ids])).logits[0].tolist()
    print(json.dumps(answer))


if __name__ == "__main__":
    main(*sys.argv[1:4])
