"""VLM rewards (rewards/vlm.py) on tiny random Qwen2-VL and LLaVA models built offline.

How the tiny models are built (no files, no network): a byte-level BPE tokenizer with the 256
byte symbols and no merges (every UTF-8 byte is one token) plus the family's special tokens,
wrapped in ``Qwen2Tokenizer``; a short Jinja chat template in the family's format; the
family's image processor at a fixed small size; and a 1-layer, 32-wide model from a config.
"""

import base64
import hashlib
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import BaseAndBonus, build_reward, registered_rewards
from rewards.prompts.firm import FIRM_PROMPTS
from rewards.vlm import (
    ARTIFACT_TEMPLATE,
    DESCRIBE_QUERY,
    QWEN_SPECIALS,
    QWEN_TEMPLATE,
    VQASCORE_TEMPLATE,
    ArtifactGuard,
    FirmCritic,
    LocalVLM,
    PromptEcho,
    YesNoJudge,
    byte_tokenizer,
    logits_at,
    parse_score,
    parse_scores,
    to_pil_images,
    user_turn,
)

IMAGE_SIZE = 32
PROMPTS = ["a red circle", "two blue squares left of a green triangle", "a cat"]

LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{{ '\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_qwen2_vl(seed=0):
    """(model, processor): 1-layer Qwen2-VL, 32 wide; a 32 px image becomes 56 px = 4 image tokens."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = byte_tokenizer(QWEN_SPECIALS)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=None,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval(), processor


def tiny_llava(seed=0):
    """(model, processor): CLIP vision tower (28 px, patch 14: 4 image tokens) + 1-layer Llama, 32 wide."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = byte_tokenizer(["<|endoftext|>", "<image>"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), processor


BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "llava": tiny_llava}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny_vlm(request):
    """(family, model, processor) for each tiny family."""
    model, processor = BUILDERS[request.param]()
    return request.param, model, processor


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_vl()


@pytest.fixture(scope="module")
def samples():
    torch.manual_seed(1)
    return torch.rand(len(PROMPTS), 3, IMAGE_SIZE, IMAGE_SIZE)


def close(actual, expected, atol=1e-5):
    actual, expected = torch.as_tensor(actual, dtype=torch.float32), torch.as_tensor(expected, dtype=torch.float32)
    assert torch.allclose(actual, expected, atol=atol, rtol=0, equal_nan=True), f"{actual} != {expected}"


def label_loss(model, processor, image, query, answer):
    """The model's own loss with labels on ``answer`` only (built independently of rewards.vlm)."""
    prefix = processor.apply_chat_template(user_turn([image], query), add_generation_prompt=True, tokenize=False)
    prefix_len = processor(text=[prefix], images=[image], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[prefix + answer], images=[image], return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :prefix_len] = -100
    with torch.no_grad():
        return float(model(**inputs, labels=labels).loss), int((labels != -100).sum())


# ----------------------------------------------------------------------------- PromptEcho


def test_prompt_echo_equals_model_label_loss(tiny_vlm, samples):
    family, model, processor = tiny_vlm
    mean = PromptEcho(model, processor)(samples, PROMPTS)
    total = PromptEcho(model, processor, reduction="sum")(samples, PROMPTS)
    for i, (image, prompt) in enumerate(zip(to_pil_images(samples), PROMPTS)):
        loss, count = label_loss(model, processor, image, DESCRIBE_QUERY, prompt)
        assert count == len(prompt.encode()) == int(mean.extras["num_tokens"][i])  # one byte = one token
        close(mean.scores[i], -loss)
        close(total.scores[i], -loss * count, atol=1e-4)
    assert bool((mean.scores < 0).all())


def test_prompt_echo_batch_invariant(tiny_vlm, samples):
    _, model, processor = tiny_vlm
    reward = PromptEcho(model, processor, batch_size=2)  # chunks of 2 and 1, right-padded
    batched = reward(samples, PROMPTS).scores
    single = [reward(samples[i:i + 1], PROMPTS[i:i + 1]).scores[0] for i in range(len(PROMPTS))]
    close(batched, torch.stack(single))


def test_prompt_echo_empty_prompt_is_nan_and_query_matters(qwen, samples):
    model, processor = qwen
    out = PromptEcho(model, processor)(samples[:2], ["", "a cat"])
    assert out.nan_count == 1 and math.isnan(float(out.scores[0])) and not math.isnan(float(out.scores[1]))
    other = PromptEcho(model, processor, query="What is shown?")(samples[1:2], ["a cat"])
    assert float(other.scores[0]) != pytest.approx(float(out.scores[1]), abs=1e-7)
    with pytest.raises(ValueError, match="reduction"):
        PromptEcho(model, processor, reduction="max")


# ----------------------------------------------------------------------------- yes / no


def manual_p_yes(model, processor, images, question):
    """P("Y") / (P("Y") + P("N")) from the model's last logits; byte tokens: "Yes" -> "Y"."""
    conversation = user_turn(images, question)
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[images], return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits[0, -1].softmax(-1)
    yes, no = processor.tokenizer.convert_tokens_to_ids(["Y", "N"])
    return float(probs[yes] / (probs[yes] + probs[no]))


def test_yes_no_matches_next_token_probabilities(tiny_vlm, samples):
    _, model, processor = tiny_vlm
    out = YesNoJudge(model, processor, batch_size=2)(samples, PROMPTS)
    images = to_pil_images(samples)
    for i, prompt in enumerate(PROMPTS):
        close(out.scores[i], manual_p_yes(model, processor, [images[i]], VQASCORE_TEMPLATE.replace("{prompt}", prompt)))
    assert bool(((out.scores > 0) & (out.scores < 1)).all())
    assert bool(((out.extras["yes_no_mass"] > 0) & (out.extras["yes_no_mass"] < 1)).all())


def test_yes_no_with_reference_image(qwen, samples):
    model, processor = qwen
    judge = YesNoJudge(model, processor, batch_size=2)
    references = samples.flip(0)
    out = judge(samples, PROMPTS, references=references)
    ref_images, images = to_pil_images(references), to_pil_images(samples)
    for i, prompt in enumerate(PROMPTS):
        question = judge.reference_template.replace("{prompt}", prompt)
        close(out.scores[i], manual_p_yes(model, processor, [ref_images[i], images[i]], question))
    assert not torch.allclose(out.scores, judge(samples, PROMPTS).scores)
    with pytest.raises(ValueError, match="references="):
        judge(samples, PROMPTS, references=references[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        judge(samples, PROMPTS, references=references * 2 - 1)


def test_yes_no_words_must_differ(qwen):
    with pytest.raises(ValueError, match="share a first token"):
        YesNoJudge(*qwen, yes_words=("Yes",), no_words=("Yeah",))


def test_artifact_guard_is_one_minus_p_yes_and_shares_a_model(qwen, samples):
    vlm = LocalVLM(*qwen)
    guard = build_reward({"name": "artifact_guard", "model": vlm})
    judge = YesNoJudge(vlm, template=ARTIFACT_TEMPLATE)
    assert guard.vlm is judge.vlm is vlm
    out = guard(samples)  # no prompts needed
    close(out.scores, 1 - judge(samples, PROMPTS).scores)
    close(out.extras["p_artifact"], 1 - out.scores)
    assert guard.raw_range == (0.0, 1.0)


# ----------------------------------------------------------------------------- FIRM critics


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ('{"score": 4}', "score", 4.0),
        ('Reasoning...\n```json\n{"score": 3.5, "reason": "ok"}\n```', "score", 3.5),
        ('{"Score": "4"}', "score", 4.0),
        ('{"score": "4/5"}', "score", 4.0),
        ('draft {"score": 2} ... final {"score": 5}', "score", 5.0),  # the last one wins
        ('{"score": null} Final Score: 3', "score", 3.0),  # a null JSON value falls through
        ('{"score": true}', "score", None),
        ('{"score": "high"}', "score", None),
        ("The answer is \\boxed{4}.", "score", 4.0),
        ("\\boxed{2} then \\boxed{ 3 }", "score", 3.0),
        ("\\boxed{4/5}", "score", 4.0),
        ("\\boxed{\\text{5}}", "score", 5.0),
        ("Final Score: 2", "score", 2.0),
        ("**Final Score:** 4", "score", 4.0),
        ("score = 1", "score", 1.0),
        ("final score: 7", "score", 7.0),  # parsed; the caller rejects out-of-range values
        ("<think>score: 1</think>\nFinal Score: 5", "score", 5.0),  # reasoning is ignored
        ("<think>Final Score: 4", "score", None),  # unfinished reasoning: not an answer
        ("I see 3 circles and 2 squares.", "score", None),
        ("", "score", None),
        (None, "score", None),
        ("scores are hard", "score", None),
        ('{"aesthetics": 4, "quality": 2, "structure": 5}', "quality", 2.0),
        ('{"aesthetics": 4, "quality": 2, "structure": 5}', "structure", 5.0),
        ("aesthetics: 3, quality: 4, structure: 2", "aesthetics", 3.0),
        ('{"aesthetics": 4}', "quality", None),
        ("\\boxed{4}", "quality", None),  # \boxed{} answers only the main score
        ('{"critique": {"score": 3}}', "score", 3.0),  # nested: read by the free-text rule
        ("4", "score", 4.0),  # the whole answer is one number
        (" 3.5.\n", "score", 3.5),
        ("4", "quality", None),
        ('{"score": 4', "score", 4.0),  # truncated JSON: free text still reads it
        # FIRM's trained answer formats (VisionXLab/FIRM-Reward prompt templates)
        ('{"score": [4]}', "score", 4.0),
        ('"score" : [4]', "score", 4.0),
        ('{\n"reasoning" : "The hat is red, as asked.",\n"score" : [4]\n}', "score", 4.0),
        ('{\n  "score" : [4, 2, 5],\n  "reasoning" : "..."\n}', "score", None),  # several: no reduce given
        ('"score": [4, 2, 5]', "score", None),
        ("**Final Alignment Rating: 3**\n\\boxed{3}", "score", 3.0),
        ("**Final Alignment Rating: [2]**", "score", 2.0),
        ("\\boxed{[4]}", "score", 4.0),
        ("\\\\boxed{5}", "score", 5.0),  # the template's doubled backslash, echoed
        ('"score" : [1/2/3/4/5]', "score", None),  # the unfilled template is no answer
        ("**Final Alignment Rating: [Rating]**\n\\boxed{[Rating]}", "score", None),
        ('{"score": []}', "score", None),
        ('{"score": [4, "high"]}', "score", None),
    ],
)
def test_parse_score(text, key, expected):
    assert parse_score(text, key) == expected


def test_parse_scores_lists_and_reductions():
    quality = '{\n  "score" : [4, 2, 5],\n  "reasoning" : "sharp, a little flat"\n}'
    assert parse_scores(quality) == [4.0, 2.0, 5.0] and parse_scores('"score": [4, 2, 5]') == [4.0, 2.0, 5.0]
    assert parse_scores('{"score": [4]}') == [4.0] == parse_scores("Final Score: 4")
    assert [parse_score(quality, reduce=r) for r in ("first", "min", "max", "mean")] == [4.0, 2.0, 5.0, 11 / 3]
    assert parse_score('{"score": [3]}', reduce="min") == 3.0 and parse_scores("no score") is None
    with pytest.raises(ValueError, match="reduce must be one of"):
        parse_score(quality, reduce="median")


def decode_parts(conversation):
    """(images as uint8 arrays, question) of a FirmCritic conversation."""
    content = conversation[0]["content"]
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))))
              for p in content if p["type"] == "image_url"]
    return images, content[-1]["text"]


class FakeBackend:
    """A generate_fn returning canned answers and recording what it was sent."""

    def __init__(self, answers):
        self.answers, self.seen = list(answers), []

    def __call__(self, conversations):
        self.seen += conversations
        return [self.answers.pop(0) for _ in conversations]


def test_firm_instruction_critic_parses_and_counts_failures(samples):
    backend = FakeBackend(['{"score": 5}', "I cannot tell.", "Final Score: 9"])
    critic = build_reward({"name": "firm_critic", "critic": "instruction", "prompts": "genalign",
                           "generate_fn": backend, "batch_size": 2})
    out = critic(samples, PROMPTS)
    close(out.scores, [5.0, math.nan, math.nan])
    assert out.nan_count == 2 and out.extras["unparsable"] == 1 and out.extras["out_of_range"] == 1
    assert out.extras["texts"][1] == "I cannot tell."
    images, question = decode_parts(backend.seen[0])
    assert len(images) == 1 and np.array_equal(images[0], (samples[0].permute(1, 2, 0) * 255).round().byte().numpy())
    assert f'"{PROMPTS[0]}"' in question and '{"score": <1-5>}' in question


def test_firm_quality_critic_takes_the_minimum_and_needs_no_prompt(samples):
    answers = ['{"aesthetics": 4, "quality": 2, "structure": 5}', '{"aesthetics": 4, "quality": 3}', None]
    out = FirmCritic("quality", generate_fn=FakeBackend(answers), prompts="genalign")(samples)
    close(out.scores, [2.0, math.nan, math.nan])
    close(out.extras["quality"], [2.0, math.nan, math.nan])
    assert out.extras["unparsable"] == 1 and out.extras["no_answer"] == 1


def test_firm_edit_critic_sends_source_first(samples):
    backend = FakeBackend(['{"score": 4}'] * 3)
    critic = FirmCritic("consistency", generate_fn=backend, prompts="genalign")
    with pytest.raises(ValueError, match="source_images"):
        critic(samples, PROMPTS)
    out = critic(samples, PROMPTS, source_images=samples.flip(0))
    close(out.scores, [4.0] * 3)
    images, question = decode_parts(backend.seen[0])
    assert len(images) == 2 and np.array_equal(images[0], to_pil_images(samples[-1:])[0])
    assert "UNINTENDED" in question and PROMPTS[0] in question


# SHA-256 of FIRM's released templates as the critics read them (str.format applied, placeholders kept),
# checked against VisionXLab/FIRM-Reward@575b7159dd1088f1add26afbde72f1e184a3880a.
FIRM_PROMPT_SHA256 = {
    "execution": "4bb06e81f40f25f5cd82c893468a56395b9ba625cd9baa73e206c39e5c3d3c2d",
    "consistency": "45716ea82c941cf9c9cd2795e017fd16f225ea9ecfee7e70b59783a0ecade279",
    "instruction": "51c50e99090b8c23b7bb1f44a4071e77d5966b3ffb682720150852acd6f00eb8",
    "quality": "1b39d8349a06fe07b717301ee968011a38a112f1fe675167e7cb44fb7b34bfd4",
}


def test_firm_prompts_are_the_released_text():
    assert {k: hashlib.sha256(v.encode()).hexdigest() for k, v in FIRM_PROMPTS.items()} == FIRM_PROMPT_SHA256
    assert all("{prompt}" in FIRM_PROMPTS[k] for k in ("execution", "consistency", "instruction"))
    assert "{prompt}" not in FIRM_PROMPTS["quality"] and "{requirement}" in FIRM_PROMPTS["instruction"]
    assert not any("{{" in t for t in FIRM_PROMPTS.values())  # rendered: escaped braces are single


def test_firm_critics_send_firms_prompts_and_read_firms_answers(samples):
    edit = FakeBackend(['{\n"reasoning" : "Hat added.",\n"score" : [5]\n}', '"score" : [2]', '"score" : [1/2/3/4/5]'])
    out = FirmCritic("execution", generate_fn=edit)(samples, PROMPTS, source_images=samples.flip(0))
    close(out.scores, [5.0, 2.0, math.nan])
    assert out.extras["unparsable"] == 1
    images, question = decode_parts(edit.seen[1])
    assert len(images) == 2 and question == FIRM_PROMPTS["execution"].replace("{prompt}", PROMPTS[1])

    report = "Let's evaluate the image against the Original Prompt:\n...\n**Final Alignment Rating: {0}**\n\\boxed{{{0}}}"
    instruction = FakeBackend([report.format(4), report.format(1), "**Final Alignment Rating: [3]**"])
    out = FirmCritic("instruction", generate_fn=instruction)(samples, PROMPTS, requirements=["", "", "no text"])
    close(out.scores, [4.0, 1.0, 3.0])
    images, question = decode_parts(instruction.seen[2])
    assert len(images) == 1 and question == (FIRM_PROMPTS["instruction"].replace("{prompt}", PROMPTS[2])
                                             .replace("{requirement}", "no text"))
    assert decode_parts(instruction.seen[0])[1].endswith("### Additional Requirement (if any)\n\n")

    answers = ['{\n  "score" : [4, 2, 5],\n  "reasoning" : "..."\n}', '{"score": [4, 2]}', '{"score": [4, 2, 7]}']
    out = FirmCritic("quality", generate_fn=FakeBackend(answers))(samples)
    close(out.scores, [2.0, math.nan, math.nan])
    close(torch.stack([out.extras[k] for k in ("aesthetics", "quality", "structure")])[:, 0], [4.0, 2.0, 5.0])
    assert out.extras["unparsable"] == 1 and out.extras["out_of_range"] == 1
    mean = FirmCritic("quality", generate_fn=FakeBackend(answers), reduce="mean")(samples)
    close(mean.scores, [11 / 3, math.nan, math.nan])
    assert FirmCritic("quality", generate_fn=FakeBackend([])).conversations(samples, None)[0][0]["content"][-1][
        "text"] == FIRM_PROMPTS["quality"]


def test_firm_critic_arguments(qwen, samples):
    with pytest.raises(ValueError, match="exactly one"):
        FirmCritic("instruction")
    with pytest.raises(ValueError, match="exactly one"):
        FirmCritic("instruction", model=qwen[0], processor=qwen[1], generate_fn=FakeBackend([]))
    with pytest.raises(ValueError, match="critic must be"):
        FirmCritic("style", generate_fn=FakeBackend([]))
    with pytest.raises(ValueError, match="returned 1 answers for 3"):
        FirmCritic(generate_fn=lambda conversations: ["4"])(samples, PROMPTS)
    with pytest.raises(ValueError, match="prompts must be"):
        FirmCritic(generate_fn=FakeBackend([]), prompts="mine")
    with pytest.raises(ValueError, match="reduce must be"):
        FirmCritic("quality", generate_fn=FakeBackend([]), reduce="max")
    with pytest.raises(ValueError, match="2 requirements for 3"):
        FirmCritic(generate_fn=FakeBackend([]))(samples, PROMPTS, requirements=["a", "b"])


def test_firm_qma_base_and_bonus(samples):
    instruction = FirmCritic("instruction", generate_fn=FakeBackend(["\\boxed{5}", '{"score": [3]}', "?"]))
    quality = FirmCritic("quality", generate_fn=FakeBackend(['{"score" : [3, 4, 5], "reasoning" : ""}'] * 3))
    out = BaseAndBonus(instruction, quality, mode="qma")(samples, PROMPTS)
    close(out.scores, [1.0 * (0.4 + 0.6 * 0.5), 0.5 * (0.4 + 0.6 * 0.5), math.nan])
    genalign = FirmCritic("quality", prompts="genalign", generate_fn=FakeBackend(
        ['{"aesthetics": 3, "quality": 4, "structure": 5}'] * 3))
    close(genalign(samples).scores, [3.0] * 3)


def test_local_generation_is_batch_invariant_and_feeds_the_critic(tiny_vlm, samples):
    _, model, processor = tiny_vlm
    vlm = LocalVLM(model, processor, max_new_tokens=6)
    conversations = [user_turn([image], prompt) for image, prompt in zip(to_pil_images(samples), PROMPTS)]
    batched = vlm.generate(conversations)
    assert batched == [vlm.generate([c])[0] for c in conversations]
    assert all(isinstance(text, str) for text in batched)
    # Random weights answer gibberish: every sample is NaN and counted, the source image travels too.
    out = FirmCritic("execution", model=vlm, max_new_tokens=4)(samples, PROMPTS, source_images=samples)
    assert out.nan_count == len(PROMPTS) == out.extras["unparsable"] + out.extras["out_of_range"]


# ----------------------------------------------------------------------------- logits at positions


def pre_5_21_head(model):
    """The same weights behind a head that applies ``logits_to_keep`` as transformers < 5.21 does:
    ``hidden[:, keep]`` (a 2-D [B, K] keep gives [B, B, K, V])."""

    class IndexingHead(type(model)):
        def forward(self, *args, logits_to_keep=0, **kwargs):
            out = super().forward(*args, **kwargs)  # every position
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            out.logits = out.logits[:, keep]
            return out

    legacy = IndexingHead(model.config).eval().requires_grad_(False)
    legacy.load_state_dict(model.state_dict())
    return legacy


def test_logits_at_reads_each_rows_own_positions_on_any_head(tiny_vlm, samples):
    _, model, processor = tiny_vlm
    vlm, legacy = LocalVLM(model, processor), LocalVLM(pre_5_21_head(model), processor)
    inputs = vlm.encode([user_turn([image], p) for image, p in zip(to_pil_images(samples), PROMPTS)])
    positions = torch.tensor([[2, 9], [9, 4], [0, 2]])  # [B, K], different per row
    with torch.no_grad():
        full = model(**inputs).logits  # [B, L, V]
        assert legacy.model(**inputs, logits_to_keep=positions).logits.shape[:3] == (3, 3, 2)  # the trap
        for head in (model, legacy.model):
            got = logits_at(head, inputs, positions)
            assert got.shape == (3, 2, full.shape[-1])
            close(got, torch.stack([full[b, positions[b]] for b in range(3)]))
    close(PromptEcho(legacy)(samples, PROMPTS).scores, PromptEcho(vlm)(samples, PROMPTS).scores)
    close(YesNoJudge(legacy)(samples, PROMPTS).scores, YesNoJudge(vlm)(samples, PROMPTS).scores)


# ----------------------------------------------------------------------------- loading


def test_from_pretrained_matches_built_model(qwen, samples, tmp_path):
    model, processor = qwen
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = build_reward({"name": "prompt_echo", "model": str(tmp_path), "device": "cpu", "dtype": "fp32"})
    assert loaded.vlm.dtype == torch.float32 and loaded.vlm.device.type == "cpu"
    close(loaded(samples, PROMPTS).scores, PromptEcho(model, processor)(samples, PROMPTS).scores)
    judge = build_reward({"name": "vlm_yes_no", "model": tmp_path})  # a Path works too
    close(judge(samples, PROMPTS).scores, YesNoJudge(model, processor)(samples, PROMPTS).scores)


def test_registered_and_documented(qwen):
    names = registered_rewards()
    for name, cls in [("prompt_echo", PromptEcho), ("vlm_yes_no", YesNoJudge),
                      ("artifact_guard", ArtifactGuard), ("firm_critic", FirmCritic)]:
        assert names[name] is cls and "range" in cls.__doc__.lower()
    with pytest.raises(ValueError, match="processor"):
        PromptEcho(qwen[0])
    with pytest.raises(ValueError, match="dtype"):
        PromptEcho(qwen[0], qwen[1], dtype="fp8")
