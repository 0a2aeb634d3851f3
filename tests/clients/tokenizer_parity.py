"""Tokenizer parity: the router's token ids (`POST /tokenize`, what it routes on) against
transformers' own (`apply_chat_template(..., tokenize=True)`, `tokenizer(prompt)`) for a real
model's tokenizer (DeepSeek's tokenizer.json, shipped inside the litellm package) under three
real chat templates (Llama 3's, Qwen2's ChatML, and DeepSeek V3's layout, whose turns sit between
the tokenizer's own added tokens). Each conversation is also sent growing turn by turn and then
again, so the router answers from its cache of tokenized pieces (checked in /metrics).

Usage: tokenizer_parity.py SWITCHYARD_BIN TOKENIZER_JSON
"""

import faulthandler
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request

from procs import stop
from transformers import AutoTokenizer

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEEPSEEK = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello! How are you?"}],
    [
        {"role": "system", "content": "  You are terse.  "},
        {"role": "user", "content": "Summarise: the quick brown fox jumps over the lazy dog."},
        {"role": "assistant", "content": "A fox jumps a dog."},
        {"role": "user", "content": "Now in French, with émojis 🦊 and 中文."},
    ],
    [{"role": "user", "content": "def f(x):\n    return x ** 2\n\n# tabs\tand   spaces"}],
    [
        {"role": "system", "content": "You review code. Answer in full sentences and quote the lines you mean. " * 2},
        {"role": "user", "content": "Why does this loop never end?\n\nwhile i < 10:\n    print(i)\n  # i is never incremented " * 2},
        {"role": "assistant", "content": " Because `i` is never incremented: the condition `i < 10` stays true forever. 🔁 " * 2},
        {"role": "user", "content": "And in 中文, with the fix as a diff please, keeping   the spacing\t exactly. " * 2},
    ],
]
PROMPTS = ["Once upon a time", "  leading spaces and a tab\t", "数字 12345 and symbols <>&"]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def model_dir(tokenizer_json, template):
    d = tempfile.mkdtemp(prefix="switchyard-parity-")
    shutil.copy(tokenizer_json, f"{d}/tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"content": "<｜begin▁of▁sentence｜>", "__type": "AddedToken"},
        "eos_token": "<｜end▁of▁sentence｜>",
        "chat_template": template,
    }
    with open(f"{d}/tokenizer_config.json", "w") as f:
        json.dump(config, f)
    return d


def check(binary, tokenizer_json, name, template):
    d = model_dir(tokenizer_json, template)
    reference = AutoTokenizer.from_pretrained(d)
    proc = subprocess.Popen(
        [binary, "--sim-workers", "1", "--port", "0", "--tokenizer-path", d, "--log-level", "warn"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        m = re.match(r"switchyard listening on (\S+)", proc.stdout.readline())
        assert m, "router did not start"
        url = m.group(1)
        for _ in range(2):
            for full in CONVERSATIONS:
                for turns in range(1, len(full) + 1):
                    conv = full[:turns]
                    want = reference.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
                    if hasattr(want, "keys"):  # newer transformers return a BatchEncoding
                        want = want["input_ids"]
                    got = post(f"{url}/tokenize", {"messages": conv})["tokens"]
                    assert got == list(want), f"{name}: chat mismatch\nrouter: {got}\nref:    {list(want)}"
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
            metrics = r.read().decode()
        hits = re.search(r"^switchyard_tokenizer_cache_hits_total (\d+)", metrics, re.M)
        assert hits and int(hits.group(1)) > 0, f"{name}: no answer came from the piece cache"
        for prompt in PROMPTS:
            want = reference(prompt)["input_ids"]
            got = post(f"{url}/tokenize", {"prompt": prompt})["tokens"]
            assert got == want, f"{name}: prompt mismatch {prompt!r}\nrouter: {got}\nref:    {want}"
        print(f"{name}: {len(CONVERSATIONS)} conversations and {len(PROMPTS)} prompts tokenized identically")
    finally:
        stop(proc)
        shutil.rmtree(d, ignore_errors=True)


def main():
    # Nothing here may hang CI: past this the stacks are printed and the script exits non-zero.
    faulthandler.dump_traceback_later(600, exit=True)
    binary, tokenizer_json = sys.argv[1], sys.argv[2]
    check(binary, tokenizer_json, "llama3 template", LLAMA3)
    check(binary, tokenizer_json, "chatml template", CHATML)
    check(binary, tokenizer_json, "deepseek v3 template", DEEPSEEK)
    print("tokenizer parity: ok")


if __name__ == "__main__":
    main()
