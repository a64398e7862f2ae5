"""Plant the bugs of issue 17 by hand, one at a time, and show which tests catch each one.

    python tests/planted_bugs.py                  # every bug against the role tests
    python tests/planted_bugs.py -k lambda        # only the bugs whose name contains "lambda"

Each bug is a one-line edit of a source file; the file's original text is written back after the
run (even on Ctrl-C). Not collected by pytest (not a test module); slow-ish (one pytest run per bug).
A bug that no test catches prints "NOT CAUGHT" and the script exits 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLE_TESTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "model").glob("test_roles_*.py"))

BUGS = {  # name: (file, original text, planted text)
    "depth_fg_bg_swapped": ("cnc_model/cnc/conditioning.py",
        "fg_depth=expand_batch(fg, batch),\n            bg_depth=expand_batch(bg, batch),",
        "fg_depth=expand_batch(bg, batch),\n            bg_depth=expand_batch(fg, batch),"),
    "depth_concat_order": ("cnc_model/cnc/local_fuser.py",
        "h = torch.cat([self.fg_stream(fg_depth), self.bg_stream(bg_depth)], dim=1)",
        "h = torch.cat([self.bg_stream(bg_depth), self.fg_stream(fg_depth)], dim=1)"),
    "mask_mirrored_in_pipeline": ("cnc_model/cnc/pipeline_cnc.py",
        "user_mask = prepare_mask(mask).to(device, dtype) if mask is not None else None",
        "user_mask = prepare_mask(mask).to(device, dtype).flip(-1) if mask is not None else None"),
    "mask_flipped_updown_in_conditions": ("cnc_model/cnc/conditioning.py",
        "mask = self.mask if self.mask.shape[0] == 1 else expand_batch(self.mask, batch)",
        "mask = (self.mask if self.mask.shape[0] == 1 else expand_batch(self.mask, batch)).flip(-2)"),
    "mask_transposed_in_processor": ("cnc_model/cnc/soft_guidance.py",
        "resized = F.interpolate(self.mask, size=size, mode=\"bicubic\",",
        "resized = F.interpolate(self.mask.transpose(-1, -2), size=size[::-1], mode=\"bicubic\","),
    "glod_local_weights_swapped": ("cnc_model/glod/prepare.py",
        "local_weights=[lp.weight for lp in spec.local_prompts],",
        "local_weights=[lp.weight for lp in spec.local_prompts][::-1],"),
    "glod_local_masks_swapped": ("cnc_model/glod/prepare.py",
        "local_masks=spec_regions(spec, latent_size),",
        "local_masks=spec_regions(spec, latent_size).flip(0),"),
    "exemplars_dropped_from_uncond": ("cnc_model/cnc/conditioning.py",
        "return torch.cat([prompt_embeds, fg, bg], dim=1)",
        "fg, bg = fg.clone(), bg.clone()\n        if batch == 2:\n            fg[0], bg[0] = 0, 0\n        return torch.cat([prompt_embeds, fg, bg], dim=1)"),
    "depth_dropped_from_uncond": ("cnc_model/cnc/conditioning.py",
        "residuals = {\"down_block_additional_residuals\": down, \"mid_block_additional_residual\": mid}",
        "if batch == 2:\n            down = tuple(torch.cat([d[1:] * 0, d[1:]]) for d in down); mid = torch.cat([mid[1:] * 0, mid[1:]])\n        residuals = {\"down_block_additional_residuals\": down, \"mid_block_additional_residual\": mid}"),
    "lambda_ignored": ("cnc_model/cnc/pipeline_cnc.py",
        "fg_tokens, bg_tokens = fg_tokens * lambda_fg, bg_tokens * lambda_bg", "pass"),
    "lambda_swapped": ("cnc_model/cnc/pipeline_cnc.py",
        "fg_tokens, bg_tokens = fg_tokens * lambda_fg, bg_tokens * lambda_bg",
        "fg_tokens, bg_tokens = fg_tokens * lambda_bg, bg_tokens * lambda_fg"),
    "depth_scale_ignored": ("cnc_model/cnc/conditioning.py",
        "conditioning_scale=conditions.depth_scale,", "conditioning_scale=1.0,"),
    "mask_threshold_ignored": ("cnc_model/cnc/pipeline_cnc.py",
        "mask_t = mask_from_depth(fg_d, mask_threshold)", "mask_t = mask_from_depth(fg_d)"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only the bugs whose name contains this")
    parser.add_argument("tests", nargs="*", default=ROLE_TESTS)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missed = []
    for name, (path, old, new) in BUGS.items():
        if args.k not in name:
            continue
        target = ROOT / path
        original = target.read_text()
        if original.count(old) != 1:
            print(f"{name}: the line to change is not in {path} (code moved?)")
            missed.append(name)
            continue
        try:
            target.write_text(original.replace(old, new))
            run = subprocess.run([sys.executable, "-m", "pytest", *args.tests, "-q", "-p", "no:cacheprovider"],
                                 cwd=ROOT, env=env, capture_output=True, text=True)
        finally:
            target.write_text(original)
        failing = [line.split(" ")[1] for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        print(f"{name}: " + (f"caught by {', '.join(failing)}" if failing else "NOT CAUGHT"), flush=True)
        if not failing:
            missed.append(name)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
