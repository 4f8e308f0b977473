"""Build the byte-level BPE tokenizer that ships with the package (``assets/tiny_tokenizer``).

Run ``python -m stagewise.models.tiny_tokenizer`` to rebuild it; the result is deterministic. The training corpus
is generated here (arithmetic, R1-style traces, DeepAnalyze-style analysis turns, pandas code, plain English), so
nothing is downloaded. Special tokens follow Qwen's chat markup (``<|im_start|>``, ``<|im_end|>``,
``<|endoftext|>``); ``<think> </think> <answer> </answer>`` are added tokens (single ids, decoded as text).
The DeepAnalyze action tags are *not* in the shipped file: `stagewise.models.tiny` adds them when
``model.tiny.with_deepanalyze_tags`` is true, so that ``stage=vocab`` can be exercised on the bare vocabulary.
"""

from __future__ import annotations

import random
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"
BPE_VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Renders `role: execute` messages inside the running assistant turn as <Execute>\n…\n</Execute>\n, exactly as
# DeepAnalyze's released template does, so a trajectory stored either way tokenises identically. The
# {% generation %} markers let transformers return the assistant-token mask.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(open=false) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['assistant', 'execute'] -%}"
    "{%- if not ns.open -%}{{ '<|im_start|>assistant\\n' }}{%- set ns.open = true -%}{%- endif -%}"
    "{%- if message['role'] == 'execute' -%}"
    "{{ '<Execute>\\n' + message['content'] + '\\n</Execute>\\n' }}"
    "{%- else -%}"
    "{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] not in ['assistant', 'execute'] -%}"
    "{% generation %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{%- set ns.open = false -%}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_WORDS = (
    "the a an of to and in is it that for on with as this be are by from at or we you they not but all can has "
    "have was were will would there their which what when where how why who step first second next finally then "
    "so therefore answer question number numbers sum total add plus minus times divided equals result value "
    "compute calculate check verify let me think problem solve equation target use each only once data file "
    "table column row rows columns mean median average count maximum minimum max min group by sort filter read "
    "load csv excel sqlite database query select where analysis analyze understand code execute report insight "
    "dataset values missing clean summary statistics price sales region product customer date year month city "
    "score name id amount quantity category type result shows highest lowest per most least more less than "
    "because since given we need find final correct wrong true false error output print import pandas numpy"
).split()


def _corpus(seed: int = 0, n: int = 6000) -> list[str]:
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:
            a, b, c = (rng.randint(0, 999) for _ in range(3))
            lines.append(
                f"<think>\n{a} + {b} = {a + b}\n{a + b} + {c} = {a + b + c}\n</think>\n<answer>\n{a + b + c}\n</answer>"
            )
        elif kind == 1:
            nums = [rng.randint(1, 99) for _ in range(rng.choice([3, 4]))]
            lines.append(f"Using the numbers {nums}, create an equation that equals {rng.randint(1, 999)}. "
                         f"<answer> ({nums[0]} + {nums[1]}) * {nums[2]} </answer>")
        elif kind == 2:
            col = rng.choice(["price", "sales", "score", "amount", "quantity"])
            lines.append(
                "<Analyze>I will load the file and compute the mean.</Analyze>\n<Code>\n```python\nimport pandas as pd\n"
                f"df = pd.read_csv('data.csv')\nprint(df['{col}'].mean())\n```\n</Code>\n<Execute>\n{rng.random() * 100:.2f}\n"
                f"</Execute>\n<Understand>The mean {col} is known.</Understand>\n<Answer>Answer: {rng.randint(0, 500)}</Answer>"
            )
        elif kind == 3:
            lines.append("# Instruction\nWhich region has the highest total sales?\n\n# Data\nFile 1:\n"
                         '{"name": "sales.csv", "size": "%.1fKB"}' % (rng.random() * 50))
        elif kind == 4:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 25))).capitalize() + ".")
        else:
            lines.append(
                "import sqlite3\nconn = sqlite3.connect('db.sqlite')\nrows = conn.execute('SELECT name, COUNT(*) FROM "
                "orders GROUP BY name').fetchall()\nfor row in rows:\n    print(row)\ndf.groupby('region')['sales'].sum()"
                ".sort_values(ascending=False).head()\nStep 1: First, read the data.\n1. Load\n2. Aggregate"
            )
    return lines


def build(out_dir: Path = ASSET_DIR) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.add_tokens(ADDED_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)


if __name__ == "__main__":
    build()
    print(f"wrote {ASSET_DIR}")
