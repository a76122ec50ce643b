"""A tiny, self-built UMT5-style tokenizer for tests and tiny end-to-end runs.

The real Wan2.1 tokenizer is ``google/umt5-xxl`` (a SentencePiece unigram model of ~256k pieces, read
with ``transformers.AutoTokenizer``; docs/model-reference.md §5.3). Tests cannot download it, so
:func:`build_tiny_tokenizer` trains a SentencePiece unigram model of a few hundred pieces on the small
corpus below, fully offline and deterministically, and writes a folder laid out like the real one, so the
same loading code (``AutoTokenizer.from_pretrained(folder)``) reads both.

Folder written (``out_dir``)::

    spiece.model             SentencePiece model (the slow / sentencepiece path reads it)
    tokenizer.json           the same tokenizer for the `tokenizers` library (fast path, what loads)
    tokenizer_config.json    tokenizer_class "T5Tokenizer", extra_ids 0, model_max_length 512
    special_tokens_map.json  <pad>, </s>, <unk>

Ids follow T5: ``<pad>`` = 0, ``</s>`` = 1 (appended by ``add_special_tokens=True``), ``<unk>`` = 2; there
is no BOS and no ``<extra_id_N>`` sentinel (``extra_ids=0``), so ``len(tokenizer) == vocab_size`` and every
id fits an embedding table of ``vocab_size`` rows.
"""

from __future__ import annotations

import io
import json
import os

__all__ = ["TINY_CORPUS", "build_tiny_tokenizer"]

# Prompts of the kind Wan2.1 sees; the Chinese lines hold every character of the default negative
# prompt (docs/model-reference.md §1.3), the i2v/flf2v prefixes (§1.4), and both comma forms.
TINY_CORPUS: tuple[str, ...] = (
    "A cat walks on the grass, realistic style.",
    "A dog runs along the beach at sunset, waves crashing in the background.",
    "Two anthropomorphic cats in comfy boxing gear fight intensely on a spotlighted stage.",
    "A small red boat drifts slowly across a calm lake surrounded by tall pine trees.",
    "Close-up of a woman smiling, soft light falling on her face, cinematic shot.",
    "An astronaut rides a horse through a desert under a bright blue sky.",
    "A futuristic city at night with neon lights reflected in wet streets.",
    "Aerial view of snowy mountains, clouds moving fast, time-lapse.",
    "A chef slices fresh vegetables in a busy kitchen, steam rising from the pots.",
    "A golden retriever puppy plays with a ball in a sunny garden.",
    "Slow motion shot of a hummingbird drinking nectar from a purple flower.",
    "A train crosses an old stone bridge over a deep green valley.",
    "Children laugh and splash water at a public fountain on a summer afternoon.",
    "A robot paints a portrait in a quiet studio filled with canvases.",
    "Rain falls on a window while a candle flickers on the table.",
    "A panda eats bamboo in a misty forest, documentary footage.",
    "The camera pans left across a crowded market full of colorful fruit.",
    "An old man reads a newspaper on a park bench as pigeons gather around him.",
    "A surfer rides a huge wave, spray glittering in the morning sun.",
    "Fireworks explode over a river, their colors mirrored on the water.",
    "A butterfly lands gently on a child's open hand.",
    "High quality, 4k, detailed, sharp focus, natural colors, smooth motion.",
    "Low quality, blurry, static, overexposed, worst quality, JPEG artifacts.",
    "Ugly, deformed hands, extra fingers, messy background, three legs.",
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore; 12 shells cost $3.50 & more!",
    "What happens when the sun sets? The sky turns orange, pink and then dark blue.",
    "A knight in shining armor draws his sword in front of a castle gate.",
    "A jellyfish glows softly as it floats through the dark ocean.",
    "Leaves fall from a maple tree in autumn, swirling in the wind.",
    "A violinist plays on an empty street corner, people walking past.",
    "Macro shot of dew drops on a spider web at dawn.",
    "A hot air balloon rises above green fields and a small village.",
    "Traffic flows through a busy intersection, shot from above.",
    "一只猫在草地上散步，写实风格。",
    "夕阳下的海滩，海浪轻轻拍打着沙滩。",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走",
    "镜头晃动,镜头切换,色调艳丽,过曝,静态,细节模糊不清,字幕,风格,作品,画作,画面,静止",
    "高质量的视频，清晰的细节，自然的色彩，流畅的运动。",
)


def build_tiny_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = 384,
                         extra_corpus: tuple[str, ...] = ()) -> None:
    """Train a tiny SentencePiece unigram tokenizer and save it as a UMT5-style tokenizer folder.

    Training is offline (corpus: :data:`TINY_CORPUS`), single-threaded and deterministic: the same
    arguments write the same ``spiece.model`` bytes. Takes well under a second on a laptop core.

    Args:
        out_dir: Folder to write (created if missing; existing files of the same names are replaced).
            ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it afterwards (as
            ``T5Tokenizer`` in transformers 5, ``T5TokenizerFast`` in 4.x).
        vocab_size: Number of pieces, special tokens included (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2).
            The tokenizer's ids are then all ``< vocab_size``. Must be in [64, 1000]: the corpus is too
            small for more pieces.
        extra_corpus: Sentences trained on after :data:`TINY_CORPUS` (the trained tiny model adds its captions'
            vocabulary, so its words are whole pieces).

    Returns:
        None. The folder layout is described in the module docstring.

    Raises:
        ValueError: if ``vocab_size`` is outside [64, 1000].
        ImportError: if ``sentencepiece`` or ``transformers`` is missing.
    """
    if not 64 <= vocab_size <= 1000:
        raise ValueError(f"vocab_size must be in [64, 1000] for the tiny corpus, got {vocab_size}")
    import sentencepiece as spm  # lazy: only tests and tiny runs need it
    from transformers import AutoTokenizer

    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS + tuple(extra_corpus)),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
        hard_vocab_limit=not extra_corpus,  # a larger corpus may hold fewer distinct pieces than asked for
    )
    with open(os.path.join(out_dir, "spiece.model"), "wb") as f:
        f.write(model.getvalue())

    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": 0,
        "additional_special_tokens": [],
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        **special,
    }

    def write_json(name: str, obj: dict) -> None:
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")

    write_json("special_tokens_map.json", special)
    write_json("tokenizer_config.json", config)
    # Convert spiece.model once (the `tokenizers` converter) and write tokenizer.json beside it, so
    # later loads skip the conversion.
    AutoTokenizer.from_pretrained(os.fspath(out_dir)).save_pretrained(os.fspath(out_dir))
    # save_pretrained rewrites the two json files with version-specific and machine-specific fields
    # (e.g. "is_local"); put back the minimal ones, which every transformers >= 4.44 reads.
    write_json("special_tokens_map.json", special)
    write_json("tokenizer_config.json", config)
