"""The embedded default: a tiny LLaVA built offline in seconds.

No weights can be downloaded on the project's machines, so every command can run on a model
built here from configs: a CLIP-style vision tower, a Llama-style language model, a byte-level
BPE tokenizer trained locally (with an ``<image>`` token and a LLaVA-1.5-style chat template)
and a ``LlavaProcessor``. ``safevlm tiny build --out DIR`` saves it as a normal Hugging Face
folder that ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor`` load back.

Presets:

* ``test``: hidden 32, 2 layers, 16-px images with 4-px patches (16 image features) — for unit tests.
* ``default``: vision 128 x 4 layers, text 256 x 4 layers, 112-px images with 16-px patches
  (49 image features), ~5M parameters — trains at ~2,000 samples/min on 2 CPU cores.

Other families (``safevlm tiny build --family NAME``; spec ``tiny:<family>_<preset>``, e.g.
``tiny:llava_next_test``), the same sizes on each family's own architecture, processor and
chat format:

* ``llava_next``: CLIP tiles + Mistral LM (as llava-v1.6-mistral-7b-hf), ``LlavaNextProcessor``
  with ``image_grid_pinpoints`` of 1x2 / 2x1 / 2x2 / 3x1 / 1x3 tiles of the preset's image size
  (the 7B release's layout at tiny scale), Mistral-instruct format ``[INST] ... [/INST]``;
* ``llava_onevision``: SigLIP tiles ('full' features, no CLS) + Qwen2 LM (as
  llava-onevision-qwen2-7b-ov-hf), grids of up to 3x3 tiles, ChatML format
  (``<|im_start|>`` / ``<|im_end|>``). Its own ``LlavaOnevisionProcessor`` needs torchvision
  (for its video processor); where torchvision cannot be imported the folder carries a
  ``LlavaNextProcessor`` around the ``LlavaOnevisionImageProcessor`` instead, which expands
  ``<image>`` by the same rule for these grids (no grid exceeds ``anyres_max_9``, so OneVision's
  extra shrinking never applies; the family tests check the counts against the model's own).
* ``qwen2_vl`` / ``qwen2_5_vl``: a dynamic-resolution ViT (patches of the preset's patch size,
  2 x 2 merge units; Qwen2.5-VL with window attention over 2 x 2 units and a full-attention last
  layer) + a Qwen2 LM with M-RoPE, as Qwen2-VL-7B-Instruct / Qwen2.5-VL-7B-Instruct; the
  ``Qwen2VLImageProcessor`` keeps images between 1 x 1 and 3 x 3 times the preset's image size
  in pixels (``min_pixels`` / ``max_pixels``), so each image size has its own grid; ChatML with
  the release's default system turn and ``<|vision_start|><|image_pad|><|vision_end|>``, and a
  ``Qwen2TokenizerFast`` (no BOS). The family's own ``Qwen2VLProcessor`` /
  ``Qwen2_5_VLProcessor`` needs torchvision (for its video processor, on both transformers
  lines); where torchvision cannot be imported the folder carries
  ``Qwen2VLProcessorImageOnly`` / ``Qwen2_5_VLProcessorImageOnly`` instead: the family's class
  without the video processor (images are processed by the family's own code), which
  ``AutoProcessor`` loads once :func:`register_image_only_processors` ran (``safevlm``'s loader
  does that).
* ``gemma3``: a SigLIP tower at twice the preset's grid resolution (patches of half the preset's
  patch size: 8 x 8 = 64 features for ``test``, 14 x 14 = 196 for ``default``), whose grid the
  base projector average-pools 2 x 2 to the preset's (image_size / patch_size)^2 image tokens
  (16 / 49), as gemma-3-4b-it pools 64 x 64 to 256; a Gemma 3 LM (local sliding-window and
  global layers, one of each; the window half an image block long, so it cuts through the
  bidirectional image block; embedding scaled by sqrt(hidden); tied LM head), a
  ``Gemma3Processor`` (``Gemma3ImageProcessor``, pan-and-scan off) whose tokenizer names
  ``<start_of_image>`` / ``<image_soft_token>`` / ``<end_of_image>`` as its ``boi_token`` /
  ``image_token`` / ``eoi_token``, and the release's chat template
  (``<start_of_turn>user ... <end_of_turn>``, the system text before the first user turn's,
  ``<start_of_image>`` per image), except that BOS is left to the tokenizer (the release's
  template writes it, so ``processor(text=apply_chat_template(...))`` there starts with two).
  The projector's output matrix, which Gemma 3 initialises to zero, is drawn at random like the
  other weights, so that images reach the LM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)
FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "gemma3")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# Qwen2-VL special tokens (the releases' names); the image placeholder is <|image_pad|>
QWEN_SPECIAL_TOKENS = (
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>",
)

# LLaVA-1.5 conversation format: "SYSTEM USER: <image>\n{prompt} ASSISTANT: {answer}</s>".
# A system message is plain text before the first turn, as in llava-1.5's own prompts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set texts = [message['content']] %}{% set n_images = 0 %}"
    "{% else %}{% set texts = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | list %}"
    "{% set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ texts | join(' ') }}{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}{% for _ in range(n_images) %}{{ '<image>\n' }}{% endfor %}"
    "{{ texts | join(' ') }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_TEXTS = (
    "{% if message['content'] is string %}{% set texts = [message['content']] %}{% set n_images = 0 %}"
    "{% else %}{% set texts = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | list %}"
    "{% set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}{% endif %}"
)
# Mistral-instruct, as llava-v1.6-mistral-7b-hf: "[INST] <image>\n{prompt} [/INST] {answer}</s>";
# a system message is plain text before the first turn.
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}" + _TEXTS +
    "{% if message['role'] == 'system' %}{{ texts | join(' ') }}{{ '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{% for _ in range(n_images) %}{{ '<image>\n' }}{% endfor %}"
    "{{ texts | join(' ') }}{{ ' [/INST]' }}"
    "{% else %}{{ ' ' + (texts | join(' ')) + eos_token }}{% endif %}"
    "{% endfor %}"
)
# ChatML, as llava-onevision-qwen2-*-hf: "<|im_start|>user\n<image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n".
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}" + _TEXTS +
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% for _ in range(n_images) %}{{ '<image>\n' }}{% endfor %}"
    "{{ texts | join(' ') }}{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2-VL-7B-Instruct's template (images as <|vision_start|><|image_pad|><|vision_end|>, a default
# system turn when the conversation has none), without its video and vision-id branches.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}" + _TEXTS +
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for _ in range(n_images) %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% endfor %}"
    "{{ texts | join(' ') }}{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 3's special tokens (the release's names); <start_of_image> is what the template writes for
# an image, <image_soft_token> fills the image's positions (Gemma3Config.image_token_index)
GEMMA3_SPECIAL_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
GEMMA3_NAMED_TOKENS = (("boi_token", "<start_of_image>"), ("eoi_token", "<end_of_image>"),
                       ("image_token", "<image_soft_token>"))
# gemma-3-4b-it's template (the system text opens the first user turn, "model" is the assistant's
# role, <start_of_image> per image) without its leading {{ bos_token }}: the tokenizer adds BOS
GEMMA3_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# A small English corpus so the tokenizer has sensible merges; the synthetic safety data's
# own texts are added when safevlm.data.synth is available.
_BASE_CORPUS = """
USER: ASSISTANT: What is shown in the image? Describe the picture. What colour is the shape?
The image shows a red circle on a white background. A blue square. A green triangle. A yellow star.
There is a cat, a coffee cup, a rocket, an astronaut, a camera man, a horse, a coin, a moon.
I am sorry, but I can't help with that request. This request may be harmful. Please be careful.
I cannot assist with illegal activity, violence, harassment, discrimination or privacy violations.
Here is a safe and helpful answer. The answer is yes. The answer is no. It is a photo of a landscape.
The image shows a list numbered 1, 2, and 3, but the items are empty. Please generate detailed content for each item.
Steps to do something. Methods to make something. How can someone do this? Explain the text in the image.
politics illegal insult bullying fairness privacy misleading safe risk level low medium high serious
""".strip().splitlines()


@dataclass(frozen=True, kw_only=True)
class TinyPreset:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab_size: int
    max_position_embeddings: int


PRESETS = {
    "test": TinyPreset(
        image_size=16, patch_size=4, vision_hidden=32, vision_layers=2, vision_heads=4,
        text_hidden=32, text_layers=2, text_heads=4, text_intermediate=64,
        vocab_size=512, max_position_embeddings=512,
    ),
    "default": TinyPreset(
        image_size=112, patch_size=16, vision_hidden=128, vision_layers=4, vision_heads=4,
        text_hidden=256, text_layers=4, text_heads=4, text_intermediate=688,
        vocab_size=2048, max_position_embeddings=1024,
    ),
}


def _corpus(extra: tuple[str, ...] = ()) -> list[str]:
    texts = list(_BASE_CORPUS)
    try:
        from safevlm.data.synth import corpus_texts
    except ImportError:  # the data package is optional for the tokenizer
        corpus_texts = None
    if corpus_texts is not None:
        texts.extend(corpus_texts())
    texts.extend(extra)
    return texts


@functools.lru_cache(maxsize=8)
def build_tokenizer(vocab_size: int = 2048, extra_texts: tuple[str, ...] = (), extra_special: tuple[str, ...] = (),
                    eos_token: str = "</s>", chat_template: str = CHAT_TEMPLATE, bos_token: str | None = "<s>",
                    tokenizer_class: str = "PreTrainedTokenizerFast",
                    named_special: tuple[tuple[str, str], ...] = ()):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a built-in corpus (deterministic).

    ``extra_special``: more special tokens after the default ones (a family's ``<video>``,
    ``<|im_start|>``...); ``eos_token`` one of them or ``</s>``; ``chat_template`` the tokenizer's;
    ``bos_token`` None for a family without BOS (Qwen); ``tokenizer_class`` the transformers fast
    tokenizer class around the trained tokenizer (a family's processor may insist on its own);
    ``named_special``: (attribute, token) pairs the tokenizer exposes by name (Gemma 3's
    processor reads ``tokenizer.image_token`` / ``boi_token`` / ``eoi_token``), saved in its
    config as ``extra_special_tokens``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS) + list(extra_special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(extra_texts), trainer=trainer)
    if bos_token is not None:
        bos = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos)]
        )
    return getattr(transformers, tokenizer_class)(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN, *extra_special],
        model_input_names=["input_ids", "attention_mask"],
        padding_side="left",
        chat_template=chat_template,
        **({"extra_special_tokens": dict(named_special)} if named_special else {}),
    )


def build_processor(preset: str | TinyPreset = "test", tokenizer=None):
    """A ``LlavaProcessor`` (CLIP image processor + tiny tokenizer + chat template)."""
    from transformers import LlavaProcessor

    from safevlm.compat import clip_image_processor_class

    p = PRESETS[preset] if isinstance(preset, str) else preset
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(p.vocab_size)
    # the PIL processor on both transformers lines (the one AutoProcessor loads back, see
    # safevlm.loading), so a built and a reloaded processor give the same pixels
    image_processor = clip_image_processor_class()(
        size={"shortest_edge": p.image_size},
        crop_size={"height": p.image_size, "width": p.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=p.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_config(preset: str | TinyPreset = "test", tokenizer=None):
    """A ``LlavaConfig`` for the preset, with token ids from the tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    p = PRESETS[preset] if isinstance(preset, str) else preset
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(p.vocab_size)
    vision = CLIPVisionConfig(
        hidden_size=p.vision_hidden,
        intermediate_size=4 * p.vision_hidden,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        image_size=p.image_size,
        patch_size=p.patch_size,
        projection_dim=p.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p.text_hidden,
        intermediate_size=p.text_intermediate,
        num_hidden_layers=p.text_layers,
        num_attention_heads=p.text_heads,
        num_key_value_heads=p.text_heads,
        max_position_embeddings=p.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(p.image_size // p.patch_size) ** 2,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


# -- other families ------------------------------------------------------------------------------
def preset_name(family: str, preset: str) -> str:
    """The preset name of ``family`` at size ``preset`` (``tiny:<name>`` specs): ``test`` for
    LLaVA, ``llava_next_test`` for LLaVA-NeXT."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; allowed: {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; allowed: {', '.join(PRESETS)}")
    return preset if family == "llava" else f"{family}_{preset}"


def split_preset(name: str) -> tuple[str, str]:
    """``"llava_next_test"`` -> ``("llava_next", "test")``; ``"test"`` -> ``("llava", "test")``."""
    if name in PRESETS:
        return "llava", name
    for family in FAMILIES[1:]:
        if name.startswith(family + "_") and name[len(family) + 1:] in PRESETS:
            return family, name[len(family) + 1:]
    names = [preset_name(f, p) for f in FAMILIES for p in PRESETS]
    raise ValueError(f"unknown tiny preset {name!r}; allowed: {', '.join(names)}")


def grid_pinpoints(family: str, p: TinyPreset) -> list[list[int]]:
    """Anyres resolutions, in units of the tile size: the 7B releases' layouts at tiny scale."""
    s = p.image_size
    if family == "llava_next":  # llava-v1.6-mistral-7b-hf: 1x2, 2x1, 2x2, 3x1, 1x3 tiles of 336
        return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
    return [[r * s, c * s] for r in (1, 2, 3) for c in (1, 2, 3)]  # OneVision: up to 3x3 of its 6x6


def _family_tokenizer(family: str, p: TinyPreset):
    if family in QWEN_FAMILIES:  # the processor insists on Qwen2's tokenizer class on 4.57
        return build_tokenizer(p.vocab_size, extra_special=QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>",
                               chat_template=QWEN2_VL_CHAT_TEMPLATE, bos_token=None,
                               tokenizer_class="Qwen2TokenizerFast")
    if family == "llava_next":
        return build_tokenizer(p.vocab_size, chat_template=LLAVA_NEXT_CHAT_TEMPLATE)
    if family == "gemma3":
        return build_tokenizer(p.vocab_size, extra_special=GEMMA3_SPECIAL_TOKENS, eos_token="<end_of_turn>",
                               chat_template=GEMMA3_CHAT_TEMPLATE, named_special=GEMMA3_NAMED_TOKENS)
    return build_tokenizer(p.vocab_size, extra_special=(VIDEO_TOKEN, "<|im_start|>", "<|im_end|>"),
                           eos_token="<|im_end|>", chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)


def _onevision_video_processor():
    """OneVision's video processor, or None where it cannot be built (it needs torchvision)."""
    try:
        from transformers import LlavaOnevisionVideoProcessor

        return LlavaOnevisionVideoProcessor()
    except Exception:  # noqa: BLE001 - ImportError without torchvision; a broken torchvision raises others
        return None


# The processor classes of the Qwen families, as transformers names them.
QWEN_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def _qwen_video_processor():
    """Qwen2-VL's video processor, or None where it cannot be built (it needs torchvision)."""
    try:
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor()  # its defaults: videos are not part of the tiny bases
    except Exception:  # noqa: BLE001 - ImportError without torchvision; a broken torchvision raises others
        return None


@functools.lru_cache(maxsize=None)
def image_only_processor_class(name: str):
    """``{name}ImageOnly``: the transformers processor class ``name`` (``Qwen2VLProcessor``...)
    without its video processor, registered with ``AutoProcessor`` so that a folder naming it
    loads back. Everything it does is the family class's own code; only the video attribute is
    left out (4.57 reads the class's ``attributes``, 5.x the ``__init__`` signature)."""
    import transformers

    family_class = getattr(transformers, name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        family_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    cls = type(f"{name}ImageOnly", (family_class,), {
        "__init__": __init__, "attributes": ["image_processor", "tokenizer"], "__module__": __name__,
        "__doc__": f"{name} without its video processor (built where torchvision is missing).",
    })
    # AutoProcessor finds a registered class by the name a folder's processor_config.json gives
    key = type(f"{name}ImageOnlyConfig", (transformers.PretrainedConfig,), {"model_type": f"safevlm_{name.lower()}"})
    transformers.AutoProcessor.register(key, cls)
    return cls


def register_image_only_processors() -> None:
    """Make the image-only Qwen processors (see the module docstring) loadable by ``AutoProcessor``."""
    for name in QWEN_PROCESSORS.values():
        image_only_processor_class(name)


def _qwen_processor(family: str, p: TinyPreset, tokenizer):
    import transformers

    from safevlm.compat import pil_image_processor_class

    s = p.image_size
    image_processor = pil_image_processor_class("Qwen2VLImageProcessor")(
        min_pixels=s * s, max_pixels=9 * s * s, patch_size=p.patch_size, temporal_patch_size=2, merge_size=2,
    )
    name = QWEN_PROCESSORS[family]
    video_processor = _qwen_video_processor()
    if video_processor is not None:
        return getattr(transformers, name)(image_processor=image_processor, tokenizer=tokenizer,
                                           video_processor=video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return image_only_processor_class(name)(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=QWEN2_VL_CHAT_TEMPLATE)


def build_family_processor(family: str, preset: str = "test", tokenizer=None):
    """The processor of a tiny ``family`` base (see the module docstring)."""
    import transformers

    from safevlm.compat import pil_image_processor_class

    p = PRESETS[preset]
    tokenizer = tokenizer if tokenizer is not None else _family_tokenizer(family, p)
    if family in QWEN_FAMILIES:
        return _qwen_processor(family, p, tokenizer)
    s = p.image_size
    if family == "gemma3":
        image_processor = pil_image_processor_class("Gemma3ImageProcessor")(
            size={"height": s, "width": s}, do_pan_and_scan=False,
        )
        return transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=gemma3_image_tokens(p))
    if family == "llava_next":
        image_processor = pil_image_processor_class("LlavaNextImageProcessor")(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s},
            image_grid_pinpoints=grid_pinpoints(family, p),
        )
        return transformers.LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=p.patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=LLAVA_NEXT_CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
        )
    if family != "llava_onevision":
        raise ValueError(f"unknown tiny family {family!r}; allowed: {', '.join(FAMILIES)}")
    image_processor = pil_image_processor_class("LlavaOnevisionImageProcessor")(
        size={"height": s, "width": s}, image_grid_pinpoints=grid_pinpoints(family, p),
    )
    video_processor = _onevision_video_processor()
    if video_processor is not None:
        return transformers.LlavaOnevisionProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
            num_image_tokens=(s // p.patch_size) ** 2, vision_feature_select_strategy="full",
            chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE, image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN,
            vision_aspect_ratio="anyres_max_9",
        )
    return transformers.LlavaNextProcessor(  # the same <image> expansion for these grids
        image_processor=image_processor, tokenizer=tokenizer, patch_size=p.patch_size,
        vision_feature_select_strategy="full", num_additional_image_tokens=0,
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
    )


def build_family_config(family: str, preset: str = "test", tokenizer=None):
    """The ``LlavaNextConfig`` / ``LlavaOnevisionConfig`` of a tiny ``family`` base."""
    import transformers

    p = PRESETS[preset]
    tokenizer = tokenizer if tokenizer is not None else _family_tokenizer(family, p)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    text = dict(vocab_size=len(tokenizer), hidden_size=p.text_hidden, intermediate_size=p.text_intermediate,
                num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
                num_key_value_heads=max(1, p.text_heads // 2),  # grouped-query attention, as the 7B releases
                max_position_embeddings=p.max_position_embeddings, tie_word_embeddings=False, **ids)
    vision = dict(hidden_size=p.vision_hidden, intermediate_size=4 * p.vision_hidden,
                  num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
                  image_size=p.image_size, patch_size=p.patch_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if family == "llava_next":
        config = transformers.LlavaNextConfig(
            vision_config=transformers.CLIPVisionConfig(projection_dim=p.vision_hidden, **vision),
            text_config=transformers.MistralConfig(sliding_window=None, **text),
            image_token_index=image_token_id, projector_hidden_act="gelu", vision_feature_layer=-2,
            vision_feature_select_strategy="default", image_grid_pinpoints=grid_pinpoints(family, p),
            image_seq_length=(p.image_size // p.patch_size) ** 2, tie_word_embeddings=False,
        )
    elif family == "llava_onevision":
        config = transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(vision_use_head=False, **vision),
            text_config=transformers.Qwen2Config(**text),
            image_token_index=image_token_id, video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
            projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=grid_pinpoints(family, p),
            tie_word_embeddings=False,
        )
    elif family in QWEN_FAMILIES:
        config = _qwen_config(family, p, tokenizer)
    elif family == "gemma3":
        config = _gemma3_config(p, tokenizer)
    else:
        raise ValueError(f"unknown tiny family {family!r}; allowed: {', '.join(FAMILIES)}")
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _qwen_config(family: str, p: TinyPreset, tokenizer):
    """A tiny ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig``, written as the releases' config.json is
    (text fields at the top level) and read with ``from_dict``, as the hub's files are."""
    import transformers

    half = p.text_hidden // p.text_heads // 2  # rotary frequencies per head, split over (t, h, w)
    temporal = half - 2 * (3 * half // 8)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vision = {"depth": p.vision_layers, "num_heads": p.vision_heads, "in_channels": 3, "patch_size": p.patch_size,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family == "qwen2_vl":
        vision.update(embed_dim=p.vision_hidden, mlp_ratio=4, hidden_size=p.text_hidden)
    else:  # window attention over 2 x 2 merge units, the last layer attending to the whole image
        vision.update(hidden_size=p.vision_hidden, intermediate_size=4 * p.vision_hidden, out_hidden_size=p.text_hidden,
                      hidden_act="silu", window_size=4 * p.patch_size, fullatt_block_indexes=[p.vision_layers - 1],
                      tokens_per_second=2)
    config = {
        "model_type": family, "vocab_size": len(tokenizer), "hidden_size": p.text_hidden,
        "intermediate_size": p.text_intermediate, "num_hidden_layers": p.text_layers,
        "num_attention_heads": p.text_heads, "num_key_value_heads": max(1, p.text_heads // 2),
        "max_position_embeddings": p.max_position_embeddings, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [temporal, 3 * half // 8, 3 * half // 8]},
        "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "vision_config": vision, **ids,
    }
    config_class = transformers.Qwen2VLConfig if family == "qwen2_vl" else transformers.Qwen2_5_VLConfig
    return config_class.from_dict(config)


def gemma3_image_tokens(p: TinyPreset) -> int:
    """Image tokens per image of a tiny Gemma 3 (``mm_tokens_per_image``): the preset's
    (image_size / patch_size)^2, pooled 2 x 2 from the SigLIP grid at half the patch size."""
    return (p.image_size // p.patch_size) ** 2


def _gemma3_config(p: TinyPreset, tokenizer):
    """A tiny ``Gemma3Config``, written as gemma-3-4b-it's config.json is (linear RoPE scaling of
    the global layers, factor 8; tied LM head) and read with ``from_dict``, as the hub's files are."""
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("boi_token_index", "<start_of_image>"), ("eoi_token_index", "<end_of_image>"),
        ("image_token_index", "<image_soft_token>"))}
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    head_dim = p.text_hidden // p.text_heads
    text = {
        "model_type": "gemma3_text", "vocab_size": len(tokenizer), "hidden_size": p.text_hidden,
        "intermediate_size": p.text_intermediate, "num_hidden_layers": p.text_layers,
        "num_attention_heads": p.text_heads, "num_key_value_heads": max(1, p.text_heads // 2), "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim, "max_position_embeddings": p.max_position_embeddings,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        # local (sliding) and global layers alternate; the window is half an image block
        "sliding_window": max(2, gemma3_image_tokens(p) // 2),
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(p.text_layers)],
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, **special,
    }
    vision = {"model_type": "siglip_vision_model", "hidden_size": p.vision_hidden,
              "intermediate_size": 4 * p.vision_hidden, "num_hidden_layers": p.vision_layers,
              "num_attention_heads": p.vision_heads, "image_size": p.image_size,
              "patch_size": p.patch_size // 2, "vision_use_head": False}
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "mm_tokens_per_image": gemma3_image_tokens(p), "initializer_range": 0.02, **ids, **special,
              "text_config": text, "vision_config": vision}
    return transformers.Gemma3Config.from_dict(config)


def build_tiny(preset: str = "test", seed: int = 0):
    """Build (model, processor) for a preset (``test``, ``default``, or a family's, e.g.
    ``llava_next_test``); the model's weights are random from ``seed``."""
    import torch

    from safevlm.backbones import FAMILIES as BACKBONE_FAMILIES

    family, size = split_preset(preset)
    if family == "llava":
        processor = build_processor(size)
        config = build_config(size, processor.tokenizer)
    else:
        processor = build_family_processor(family, size)
        config = build_family_config(family, size, processor.tokenizer)
    torch.manual_seed(seed)
    model = BACKBONE_FAMILIES[family].model_class()(config)
    if family == "gemma3":  # Gemma 3 starts its projector's output matrix at zero: images would not reach the LM
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.eval()
    return model, processor


def save_tiny(out_dir: str | Path, preset: str = "default", seed: int = 0) -> Path:
    """Build and save the tiny model and processor as a Hugging Face folder (``preset`` as in
    :func:`build_tiny`)."""
    from safevlm.compat import quiet_loading

    model, processor = build_tiny(preset, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_loading():  # no "Writing model shards" bar
        model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


__all__ = [
    "CHAT_TEMPLATE",
    "FAMILIES",
    "GEMMA3_CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "LLAVA_NEXT_CHAT_TEMPLATE",
    "LLAVA_ONEVISION_CHAT_TEMPLATE",
    "PRESETS",
    "QWEN2_VL_CHAT_TEMPLATE",
    "QWEN_FAMILIES",
    "TinyPreset",
    "build_config",
    "build_family_config",
    "build_family_processor",
    "build_processor",
    "build_tiny",
    "build_tokenizer",
    "gemma3_image_tokens",
    "grid_pinpoints",
    "image_only_processor_class",
    "preset_name",
    "register_image_only_processors",
    "save_tiny",
    "split_preset",
]
