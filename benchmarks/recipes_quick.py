"""Quick comparison of SVD-LLM recipes (one JSON config per argument) on two held-out texts.

Usage:
    .venv/bin/python benchmarks/fortunes_text.py /tmp/fortunes.txt
    .venv/bin/python benchmarks/recipes_quick.py '{"ratio": 0.2}' '{"ratio": 0.2, "allocation": "global"}'

Each argument is a set of ``SvdLlmConfig`` fields; every run starts from the dense
SmolLM2-135M, calibrates on 32 x 512 Shakespeare tokens (seed 0) and reports perplexity
on the first 4096 tokens of held-out Shakespeare and of ``/tmp/fortunes.txt``, the wall
time and the fraction of targeted parameters kept. Lines are printed as runs finish.
"""

import copy
import json
import sys
import time

import rankcut
from rankcut.data import calibration_windows, load_text
from rankcut.evaluate import perplexity
from rankcut.methods import SvdLlmConfig


def main() -> None:
    tok = rankcut.load_tokenizer("smollm2-135m")
    dense = rankcut.load("smollm2-135m")
    calib = calibration_windows(load_text("shakespeare"), tok, 32, 512, 0)
    texts = {"shk": load_text("shakespeare-heldout"), "fort": load_text("/tmp/fortunes.txt")}

    def ppl(model):
        return {
            k: round(
                perplexity(model, tok, t, tokens=4096, seq_len=512, progress=False)["perplexity"], 2
            )
            for k, t in texts.items()
        }

    for spec in sys.argv[1:]:
        model = copy.deepcopy(dense)
        start = time.time()
        result = rankcut.compress(model, SvdLlmConfig(**json.loads(spec)), calib, progress=False)
        kept = result.params["targeted_after"] / result.params["targeted_before"]
        print(spec, ppl(model), f"{time.time() - start:.0f}s", round(kept, 4), flush=True)


if __name__ == "__main__":
    main()
