"""DenseAlignBench's pairwise judge prompt (PromptEcho), stored as data, exactly as the judge reads it.

Source: https://github.com/roooobotx/prompt_echo, commit 6c8a934bf97682a25e25969a0a8fbe73443b4fe5
(2026-04-21; unchanged at 84e1989415e3bdf336ffb8e872f58905b0628973), Apache License 2.0 (as its
README states; the repository has no LICENSE file); the prompt text is theirs, reproduced unmodified:
``DenseAlignEvaluator.PAIRWISE_PROMPT_FOLLOWING_TEMPLATE`` of dense_align_bench/evaluator.py.

The evaluator sends one user turn: this text, then the text "**Image A:**", image A, the text
"**Image B:**", image B; the answer is JSON ``{"reasoning": ..., "preference": "image_a" |
"image_b" | "tie"}`` (dense_align_bench/evaluate_pairwise.py shuffles the two models' slots).
Stored after the evaluator's ``str.format``: escaped braces are single and ``{prompt}`` remains as
the placeholder eval.dense replaces. Do not reformat (tests/test_eval_dense.py checks its SHA-256).
"""

PAIRWISE_PROMPT_FOLLOWING = r"""You are a professional image quality evaluator specializing in prompt adherence assessment.

Your task is to compare two AI-generated images based on how well each follows the given prompt. Focus ONLY on prompt-following accuracy - do NOT consider aesthetics, artistic quality, or photorealism.

**Prompt:**
{prompt}

**Evaluation Process:**
1. Carefully read and understand ALL requirements in the prompt:
   - Main subjects and objects
   - Actions and poses
   - Visual attributes (colors, sizes, materials, textures)
   - Composition and layout
   - Style and atmosphere
   - Any text or written elements
   - Spatial relationships (foreground, background, positions)
   - Quantities and counts

2. Examine Image A:
   - Which prompt requirements are accurately depicted?
   - Which prompt requirements are missing or incorrect?
   - Are there any elements NOT mentioned in the prompt?

3. Examine Image B:
   - Which prompt requirements are accurately depicted?
   - Which prompt requirements are missing or incorrect?
   - Are there any elements NOT mentioned in the prompt?

4. Compare:
   - Which image captures more of the prompt requirements accurately?
   - If both are equal in accuracy, select "tie"

**Preference Options:**
- "image_a": Image A follows the prompt better than Image B
- "image_b": Image B follows the prompt better than Image A
- "tie": Both images follow the prompt equally well (similar accuracy)

**Important:**
- Base your decision ONLY on prompt-following accuracy
- Ignore differences in artistic style, aesthetics, or realism
- Be objective and fair
- Choose "tie" when prompt-following quality is genuinely similar

**Output Format (strict JSON, no markdown):**
{
  "reasoning": "<Detailed explanation: 1) How well Image A follows the prompt (what's correct, what's missing); 2) How well Image B follows the prompt (what's correct, what's missing); 3) Which is better and why, or why they are equal>",
  "preference": "<image_a, image_b, or tie>"
}

Please provide an objective, thorough comparison.
"""

IMAGE_LABELS = ("**Image A:**", "**Image B:**")
PREFERENCES = ("image_a", "image_b", "tie")
