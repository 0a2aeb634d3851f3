"""Builds a small local tokenizer directory (no model hub here) for serving benchmarks
such as aiperf: a byte-level BPE trained on generated English-like text, saved as
tokenizer.json with a tokenizer_config.json so `AutoTokenizer.from_pretrained(DIR)` loads it.

Usage: python bench/make_tokenizer.py OUT_DIR
"""

import json
import os
import random
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def corpus(n=20000, seed=0):
    rng = random.Random(seed)
    words = ("the a of to and in is for on with as by at from that this it be are was lorem ipsum dolor sit amet "
             "train station route ticket delay platform weather answer question assistant user system model token").split()
    for _ in range(n):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "bench/out/tokenizer"
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "model_max_length": 131072}, f)
    print(out)


if __name__ == "__main__":
    main()
