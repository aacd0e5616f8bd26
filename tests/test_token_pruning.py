"""rewards/token_pruning.py: STP / TTP masks, and applying them to a real tiny Qwen2-VL (and LLaVA)."""

import numpy as np
import pytest
import torch

from rewards.token_pruning import (PruningConfig, combine_masks, image_patches, prune_visual_tokens,
                                   qwen_video_patches, sequence_keep_mask, stp_keep, ttp_keep,
                                   union_find_components, video_token_keep)
from rewards.video_exec import VideoBatch, tiny_video_vlm
from rewards.vlm import LocalVLM


def _components_by_search(n: int, a, b) -> list[int]:
    """Reference connected components by depth-first search: label = smallest member."""
    neighbours = [[] for _ in range(n)]
    for i, j in zip(a.tolist(), b.tolist()):
        neighbours[i].append(j)
        neighbours[j].append(i)
    labels = [-1] * n
    for start in range(n):  # ascending, so each component is first reached from its smallest member
        if labels[start] < 0:
            labels[start], stack = start, [start]
            while stack:
                for k in neighbours[stack.pop()]:
                    if labels[k] < 0:
                        labels[k] = start
                        stack.append(k)
    return labels


def test_union_find_matches_a_graph_search():
    rng = np.random.default_rng(0)
    n = 300
    a, b = rng.integers(0, n, 220), rng.integers(0, n, 220)
    roots = union_find_components(n, a, b)
    labels = _components_by_search(n, a, b)
    assert 1 < len(set(labels)) < n  # a mix of singletons and larger components
    assert roots.tolist() == labels  # same partition, each labelled by its smallest member
    assert (roots[roots] == roots).all() and (roots <= np.arange(n)).all()  # roots are the smallest members


def test_stp_removes_large_homogeneous_components():
    rng = np.random.default_rng(0)
    patches = np.zeros((2, 8, 8, 12), dtype=np.float32)  # flat background: one 64-patch component
    patches[0, :4, :4] = rng.normal(0, 5, (4, 4, 12))  # a textured 4x4 patch block in frame 0 (2x2 tokens)
    patches[1, 2:4, 2:4] = 10.0  # a small flat square (4 patches) in frame 1
    keep = stp_keep(patches, merge=2, threshold=3.0, min_component_tokens=10)
    assert keep.shape == (2, 4, 4)
    expected = np.zeros((2, 4, 4), dtype=bool)
    expected[0, :2, :2] = True  # textured tokens kept; the background (48 > 40 patches) removed
    expected[1, 1, 1] = True  # the small component (4 patches) is kept, token-mapped with "any"
    np.testing.assert_array_equal(keep, expected)
    # a background component of exactly 40 patches (10 tokens at merge 2) is not "larger than" 10 tokens
    patches = np.zeros((1, 8, 8, 3), dtype=np.float32)
    patches[0, :, 5:] = 100.0  # 8 x 3 = 24 patches vs 8 x 5 = 40 patches
    assert stp_keep(patches, 2, 3.0, 10).all()
    assert not stp_keep(patches, 2, 3.0, 5)[0, :, :2].any()


def test_ttp_drops_repeats_of_the_last_kept_token():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 4, 6)).astype(np.float32)
    patches = np.stack([base] * 5)  # 5 identical slices
    patches[2, :2, :2] += 3.0  # token (0, 0) changes at t = 2 ...
    patches[3, :2, :2] += 3.0  # ... and stays changed at t = 3 (a repeat of t = 2, not of t = 0)
    keep = ttp_keep(patches, merge=2, threshold=0.9999)
    assert keep[0].all()  # the first slice is always kept
    assert not keep[1].any() and not keep[4, 0, 1] and not keep[4, 1, 0]
    assert keep[2, 0, 0] and not keep[3, 0, 0] and keep[4, 0, 0]  # back to the t = 0 content: differs from t = 3
    assert combine_masks(keep, np.zeros_like(keep)).sum() == 0
    assert video_token_keep(patches, None).all()


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_video_vlm(hidden_size=32, num_heads=2, vision_dim=32, max_pixels=112 * 84)
    return model, processor, LocalVLM(model, processor)


def gui_like_videos():
    """Two small 'screen recordings': flat background, a static window and a moving square."""
    videos = []
    for shift in (0, 14):
        frames = np.full((6, 84, 112, 3), (40, 90, 130), dtype=np.uint8)
        frames[:, 10:70, 10:100] = 235
        frames[:, 20:28, 20:60] = 0  # a "text" line
        for t in range(6):
            frames[t, 40:54, 20 + shift + 8 * t:34 + shift + 8 * t] = (200, 30, 30)
        videos.append(frames)
    return videos


def test_qwen_patch_grid_matches_processor_layout(tiny):
    model, processor, vlm = tiny
    batch = VideoBatch(vlm, "{instruction}", ["a"], gui_like_videos()[:1], None)
    (grid,) = qwen_video_patches(batch.inputs["pixel_values_videos"], batch.inputs["video_grid_thw"])
    t, h, w = batch.inputs["video_grid_thw"][0].tolist()
    assert grid.shape == (t, h, w, 3 * 2 * 14 * 14)
    # un-patchify frame 0 (first of each temporal pair) and undo the normalisation: the input frame
    image = grid[0].view(h, w, 3, 2, 14, 14)[:, :, :, 0].permute(2, 0, 3, 1, 4).reshape(3, h * 14, w * 14)
    mean = torch.tensor(processor.video_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.video_processor.image_std).view(3, 1, 1)
    pixels = ((image * std + mean) * 255).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(pixels, gui_like_videos()[0][0], atol=1.0)


def test_keep_all_mask_gives_exactly_the_unpruned_logits(tiny):
    model, _, vlm = tiny
    batch = VideoBatch(vlm, "{instruction}", ["click Save", "type 42 into Quantity"], gui_like_videos(), None)
    with torch.no_grad():
        full = model(**batch.inputs).logits
        with prune_visual_tokens(model, torch.ones_like(batch.inputs["input_ids"], dtype=torch.bool)) as record:
            same = model(**batch.inputs).logits
    real = batch.inputs["attention_mask"].bool()
    assert record.calls == 1
    assert torch.equal(full[real], same[record.valid])


def test_pruning_keeps_rotary_positions_and_drops_tokens(tiny):
    model, _, vlm = tiny
    batch = VideoBatch(vlm, "{instruction}", ["click Save", "type 42 into Quantity"], gui_like_videos(),
                       PruningConfig())
    inputs = batch.inputs
    assert (batch.kept_ratio < 0.5).all() and (batch.kept_ratio > 0).all()  # >= 50 % of visual tokens pruned
    full_positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], None,
                                                  inputs["video_grid_thw"], inputs["attention_mask"])
    with torch.no_grad(), prune_visual_tokens(model, batch.keep) as record:
        pruned = model(**inputs).logits
    kept = batch.keep & inputs["attention_mask"].bool()
    assert record.valid.sum() == kept.sum() and pruned.shape[1] == int(kept.sum(1).max())
    for row in range(2):
        index = record.index[row][record.valid[row]]
        assert torch.equal(index, kept[row].nonzero()[:, 0])  # kept tokens, in order
        assert torch.equal(record.position_ids[:, row][:, record.valid[row]], full_positions[:, row, index])
    # the pruned forward equals running the language model by hand on the kept embeddings + positions
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    row = 1
    index = record.index[row][record.valid[row]]
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=captured["inputs_embeds"][row:row + 1, index],
                                            position_ids=full_positions[:, row:row + 1, index]).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden)[0, -1], pruned[row, int(record.valid[row].sum()) - 1],
                               atol=1e-5, rtol=1e-5)
    # the visual tokens really are fewer: the mask agrees with the per-video keep masks
    masks = [video_token_keep(g, PruningConfig()) for g in
             qwen_video_patches(inputs["pixel_values_videos"], inputs["video_grid_thw"])]
    assert torch.equal(sequence_keep_mask(inputs["input_ids"], model.config.video_token_id, masks), batch.keep)
    with pytest.raises(ValueError, match="visual tokens in input_ids but masks for"):
        sequence_keep_mask(inputs["input_ids"], model.config.video_token_id, masks[:1])


def test_llava_style_model(tmp_path):
    """The same hook prunes image tokens of a LLaVA-style model (frames given as images)."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    from rewards.vlm import byte_tokenizer

    tokenizer = byte_tokenizer()
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id),
        image_token_id=image_token, vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    frames = torch.from_numpy(gui_like_videos()[0][:, :56, :56]).permute(0, 3, 1, 2).float() / 255  # [T, 3, 56, 56]
    pixel_values = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})(
        list(frames), return_tensors="pt", do_rescale=False)["pixel_values"]  # [T, 3, 56, 56]
    per_image = 16  # (56 / 14)^2 tokens, CLS dropped ("default")
    text = tokenizer("frames: ", add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([text + [image_token] * per_image * len(frames) + text])
    keep_tokens = video_token_keep(image_patches(pixel_values, 14), PruningConfig(), merge=1)  # [T, 4, 4]
    keep = sequence_keep_mask(input_ids, image_token, [keep_tokens])
    assert 0 < keep_tokens.mean() < 0.5
    with torch.no_grad():
        full = model(input_ids=input_ids, pixel_values=pixel_values).logits
        with prune_visual_tokens(model, torch.ones_like(keep)):
            same = model(input_ids=input_ids, pixel_values=pixel_values).logits
        with prune_visual_tokens(model, keep) as record:
            pruned = model(input_ids=input_ids, pixel_values=pixel_values).logits
    assert torch.equal(full, same)
    assert pruned.shape[1] == int(keep.sum())
    assert torch.equal(record.position_ids[0], keep[0].nonzero()[:, 0])  # original 1-D positions of kept tokens
