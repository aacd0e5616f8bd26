"""FIRM's released critic prompts ("Trust Your Critic"), stored as data, exactly as the critics read them.

Source: https://github.com/VisionXLab/FIRM-Reward, commit 575b7159dd1088f1add26afbde72f1e184a3880a
(2026-03-11; unchanged at ba4149389e8902b91817fbccce90a4e3cf9f7605), Apache License 2.0 (the
repository's LICENSE); the prompt text is theirs, reproduced unmodified:

- EXECUTION, CONSISTENCY: ``SCORE_EXECUTION``, ``SCORE_CONSISTENCY`` of
  editing/reward_server/prompt_template.py (FIRM-Edit; editing/reward_server/
  reward_server_qwen3_vl_8b_sft.py sends the source image, the edited image, then this text).
  Answer: ``{"reasoning" : "...", "score" : [N]}``.
- INSTRUCTION: ``SCORE`` (= ``MODEL_PROMPT`` + the original prompt + an optional requirement) of
  generation/flow_grpo/prompt_template.py (FIRM-Gen instruction following;
  generation/flow_grpo/reward_model_server.py sends the image, then this text). Answer: an
  analysis ending in ``**Final Alignment Rating: N**`` and ``\boxed{N}``.
- QUALITY: ``Quality_PROMPT`` of the same file (FIRM-Gen quality, no prompt). Answer:
  ``{"score" : [aesthetics, quality, structure], "reasoning" : "..."}``; FIRM's QMA reward takes
  the minimum of the three.

Stored after the servers' ``str.format``: escaped braces are single, and ``{prompt}`` /
``{requirement}`` remain as placeholders that rewards.vlm replaces (plain text replacement;
FIRM passes an empty requirement unless the data has one). Everything else is byte-identical,
trailing spaces and the doubled backslash before ``boxed`` in INSTRUCTION included; do not
reformat (tests/test_rewards_vlm.py checks each template's SHA-256).
"""

EXECUTION = r"""
You are a highly skilled image evaluator. You will receive two images (an original image and a modified image) and a specific edit instruction. The second image is known to have been altered based on this instruction, starting from the first image. Your task is to evaluate the execution successfulness of the edit instruction.

Instruction: {prompt}

## Task

Evaluate the execution successfulness of the edited image according to the following scale (1 to 5):

- **5 (Perfect Execution)**: The edited image perfectly implements all aspects of the instruction. All requested changes are present and correctly executed.

- **4 (Good Execution)**: The edited image successfully implements all key aspects of the instruction, with only a very subtle missing detail that doesn't significantly affect whether the instruction was followed.

- **3 (Partial Execution)**: The edited image implements the main intent of the instruction, but some significant elements that was explicitly requested is missing or incorrectly implemented.

- **2 (Poor Execution)**: The edited image barely follows the instruction. Most requested changes are missing or incorrectly implemented, though there may be a vague attempt at following the instruction.

- **1 (No Execution)**: The edited image does not follow the instruction at all. No requested changes are visible, or the changes are completely contrary to what was requested.

**CRITICAL - Evaluation Scope**: 

- Only evaluate whether the REQUESTED changes are present and correctly implemented.
- Ignore any extra/unrequested modifications, rendering quality, realism, or unrelated consistency issues.

## Output Format

You have to give your output in this way (Keep your reasoning concise and short.):
{
"reasoning" : "<YOUR_REASONING>",
"score" : [1/2/3/4/5]
}
"""

CONSISTENCY = r"""
You are a highly skilled image evaluator. You will receive two images (an original image and a modified image) and a specific edit instruction. The second image is known to have been altered based on this instruction, starting from the first image. Your task is to evaluate how well the second image is consistent with the original image.

Instruction: {prompt}

## Definitions

**Significant Change**: A noticeable alteration that substantially affects the visual perception or semantic content of the image. 

**Minor Change**: A subtle alteration that has limited impact on overall visual perception. 

## Task

Evaluate the consistency between the images according to the following scale (1 to 5):

- **5**: ONLY the changes explicitly required by the instruction are present. All other details are completely identical between the two images.

- **4**: Besides changes explicitly required by the instruction, the second image contains **1 significant** unintended change AND/OR **1-2 minor** unintended changes.

- **3**: Besides changes explicitly required by the instruction, the second image has **2-3 significant** unintended changes AND/OR **3-4 minor** unintended changes.

- **2**: Besides changes explicitly required by the instruction, the second image has **4+ significant** unintended changes AND/OR **5+ minor** unintended changes.

- **1**: The second image is almost entirely different from the original.

## Requirements

**CRITICAL - What Consistency Means**: 

- Consistency ONLY evaluates: "Did any changes occur that were NOT mentioned in the instruction?"
- It does NOT evaluate whether the instruction was successfully executed (that is evaluated separately).

**Exceptions - Do NOT count as inconsistencies**:

- **Occlusion effects**: Elements appearing/disappearing as a natural consequence of the instructed edit (e.g., background revealed when object is removed).
- **Image quality variations**: Small differences in sharpness, blur, noise, contrast, color temperature, lighting, reflection, shadow, saturation, etc. unless the instruction explicitly addresses these attributes.
- **Entity Replacement EXPLICITLY instructed by instruction**: When the instruction explicitly requires REPLACING entity A with B, ALL attributes of the new entity B are NOT consistency issues — only evaluate whether OTHER elements (background, other objects, scene composition) remain unchanged. NOTE: For ADD/REMOVE instructions, unintended entity removals/additions ARE inconsistencies. For Attribute Modification (e.g., change color, size, position), ONLY the specified attribute may change, any other changes in attributes of the same entity are inconsistencies.
- **Environmental changes**: Environmental changes that are a DIRECT PHYSICAL consequence of the instructed edit (e.g., lights turning on when changing daytime to night, wet ground when adding rain, shadows changing when lighting changes). Note: This does NOT include material substitutions/texture or object reposition/replacements that are merely aesthetically associated with the instruction.

Note: Apart from the exceptions listed above, other changes not explicitly instructed should be counted as inconsistencies."

## Output Format

You have to give your output in this way (Keep your reasoning concise and short.):
{
"reasoning" : "<YOUR_REASONING>",
"score" : [1/2/3/4/5]
}
"""

INSTRUCTION = r"""You are an expert Image Evaluator. 
Your task is to evaluate a generated image strictly based on the Original Prompt.

### Tasks
1. Before writing, carefully inspect the image in full. Do not rush.
2. Identify all explicit and implicit requirements from the Original Prompt.
   This includes, but is not limited to, elements such as main subjects, attributes, actions,
   relationships, style, composition, and any negative constraints.
3. Perform a step-by-step evaluation by assessing whether the image satisfies each identified requirement.
4. Assign a final alignment rating according to the rating scale below.

### Rating Scale
- **5**: All requirements, details, styles, and negative constraints are correct.
- **4**: Main content is correct, but 1-2 non-critical details and requirements are slightly off.
- **3**: Main subject(s) is present, but multiple requirements and details are missing.
- **2**: The majority of main subject(s) are missing or incorrect, though a small portion of the content remains relevant.
- **1**: Image is irrelevant to the original prompt.

### Output Format
Produce the output in **plain text**, strictly following the structure below:

Begin with:
Let's evaluate the image against the Original Prompt:

1. **Identified Requirement 1**:
- [Analysis...]

2. **Identified Requirement 2**:
- [Analysis...]

(Continue until all major requirements inferred from the prompt are evaluated)

**Final Analysis**:
[A concise summary paragraph explaining the final decision and why the specific rating was chosen.]

**Final Alignment Rating: [Rating]**
\boxed{[Rating]}

### Constraints
1. The [Rating] inside \boxed{} must be one of: 5, 4, 3, 2, 1.
2. Maintain objectivity. Treat all identified requirements as a strict checklist and evaluate each one accordingly.


### Original Prompt
{prompt}
### Additional Requirement (if any)
{requirement}
"""

QUALITY = r"""You are a highly skilled image evaluator.

You will receive ONE generated image. 
Your task is to evaluate the **visual quality of this image ONLY**.

## Task
Evaluate the image across three dimensions on a 1–5 scale each:

**Important constraints:**
- Do NOT consider instruction-following or any external description (there is none).
- Base scores solely on what is visible in the single image.
- For stylized, non-photorealistic, or fantastical scenes, judge criteria by internal coherence within the depicted style.

### 1. Aesthetics (score1):
Focuses on composition design, visual elements, emotional impact, and overall visual appeal. It answers whether the image is "beautiful" and artistically balanced.
- **5**: Masterful composition, striking visual balance, harmonious color palettes, and strong artistic/emotional appeal.
- **4**: Highly pleasing and well-composed, good use of visual elements, but lacks a profound "wow" factor.
- **3**: Average composition; acceptable but somewhat plain, unmemorable, or slightly unbalanced.
- **2**: Poor composition, visually confusing, cluttered, or jarring color schemes.
- **1**: Visually chaotic, extremely unbalanced, or distinctly aesthetically displeasing.

### 2. Quality (score2):
Focuses on perceptual fidelity and the absence of degradation factors. It answers whether the image is "technically up to standard" (e.g., no noise, blur, compression).
- **5**: Pristine technical quality. Sharp, clear, with no visible noise, blur, ringing, or compression artifacts.
- **4**: Minor technical flaws (mild noise, slight blur, slight banding) that are only visible upon close inspection.
- **3**: Moderate artifacts (noticeable compression blocks, ghosting, seam lines, or inpainting boundaries) that affect overall clarity.
- **2**: Noticeable degradations (heavy distortion, severe noise, color bleeding, over/under-sharpening).
- **1**: Severe degradations (extreme distortion, prominent watermarks, heavily corrupted regions, unreadable technical quality).

### 3. Structure & Texture (score3):
Focuses on local features, geometric regularity, material properties (e.g., smoothness, roughness), detail richness, and scene complexity.
- **5**: Intricate and rich details, flawless geometric regularity, highly coherent material properties, perfect physics/anatomy/lighting within its style.
- **4**: Solid structure and rich textures, but with minor inconsistencies (e.g., slight warped geometry, minor lighting/material mismatch).
- **3**: Noticeable structural or textural issues (incorrect shadows/reflections, noticeable anatomical flaws, missing detail, flat/inconsistent textures).
- **2**: Severe structural failures (broken anatomy/limbs, impossible overlaps, severely mismatched depth/textures).
- **1**: Completely incoherent geometry, physics, or material properties; unrecognizable structures.

**Evaluation procedure:**
1. Assess **Aesthetics**: composition, color harmony, visual balance, emotional expression.
2. Identify **Quality** degradations: noise, blur, blockiness, banding, moiré, halos, edge fringing, chromatic aberration.
3. Inspect **Structure & Texture**: lighting/shadows, perspective/depth, occlusions, anatomy/poses, reflections, material/texture consistency, local detail richness and overall scene complexity.

**Output format:**
Provide the scores in a list: `[score1, score2, score3]`, where score1 is Aesthetics, score2 is Quality, and score3 is Structure & Texture. Keep your reasoning concise and short.

Output STRICTLY in the following JSON format:
{
  "score" : [score1, score2, score3],
  "reasoning" : "..."
}
"""

FIRM_PROMPTS = {"execution": EXECUTION, "consistency": CONSISTENCY, "instruction": INSTRUCTION, "quality": QUALITY}
