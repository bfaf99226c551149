"""3D novel-view fixtures (DATA.md sections 3.4 and 4.3): a tiny numpy ray caster renders 3-5 coloured
boxes on a checkered ground plane. Camera A is a random orbit pose around the scene centre; camera B is
A orbited by +90, -90 or 180 degrees. Target edit = the render from B (the helpful novel view).

Conventions (mirroring DL3DV's nerfstudio transforms.json): world y is up, the ground is y = 0;
`c2w` is a 4x4 camera-to-world matrix with OpenGL camera axes (x right, y up, -z forward); intrinsics
`fl_x, fl_y, cx, cy, w, h` in pixels; pixel (u, v) looks along c2w[:3,:3] @ ((u+.5-cx)/fl_x, -(v+.5-cy)/fl_y, -1).
An object's image position is the projection of its centre. A question is kept only when its answer
holds with a margin (8% of the width for far left/right in the image, 0.4 scene units for distance to
the camera and for a relation in B's frame, whose axis must also dominate 2:1), all
objects project inside both views and each shows >= 30 pixels in both, and the visible-pixel centroids
agree with the projected centres on the answer.

Eval files written by `export_eval`, in the public schemas:

    dl3dv.parquet      question: string, candidates: string ("A: red box; B: ..."), answer: string (letter),
                       images: list<Image>   = internlm/DL3DV-2k
    viewspatial.json   [{question_type: "Person perspective - Relative Direction", image_path:
                       ["viewspatial_images/<id>.png"], question, answer: "B. right", choices:
                       "A. left\\nB. right\\nC. front\\nD. back"}] with the PNGs beside it   = ViewSpatial-Bench.json
    viewspatial.parquet  the same entries as a table (image_path: list<string>), so that every embedded
                       task has a <task>.parquet; the returned path for "viewspatial" is this one
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .export import atomic_write_text, image_cell, write_if_changed, write_table
from .record import Record

PREFIX_3D = "Imagine a new perspective of the original image that helps answer the question. "  # edit_prefix_3d_v1
SIZE = (320, 240)
FOCAL = 280.0  # pixels (about 60 degrees horizontal field of view)
LOOK_AT = np.array([0.0, 0.4, 0.0])
COLOURS = {"red": (210, 45, 45), "blue": (45, 85, 210), "green": (45, 160, 70), "yellow": (230, 200, 40),
           "purple": (135, 65, 175), "orange": (240, 135, 30), "white": (235, 235, 235), "cyan": (30, 185, 200)}
SKY, GROUND = np.array([200, 220, 240]), (np.array([172, 166, 156]), np.array([140, 134, 126]))
LIGHT = np.array([0.4, 1.0, 0.3]) / np.linalg.norm([0.4, 1.0, 0.3])
STREAMS = {"dl3dv": 31, "viewspatial": 32}
RELATIONS = ["left", "right", "front", "back"]
QUESTION_TYPE = "Person perspective - Relative Direction"


# ----------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------
def intrinsics() -> dict[str, float]:
    return {"fl_x": FOCAL, "fl_y": FOCAL, "cx": SIZE[0] / 2, "cy": SIZE[1] / 2, "w": SIZE[0], "h": SIZE[1]}


def orbit_c2w(theta: float, elevation: float, radius: float) -> np.ndarray:
    """4x4 c2w of a camera on the orbit (azimuth theta, elevation, radius, radians) looking at LOOK_AT."""
    pos = LOOK_AT + radius * np.array([np.cos(elevation) * np.cos(theta), np.sin(elevation),
                                       np.cos(elevation) * np.sin(theta)])
    forward = (LOOK_AT - pos) / np.linalg.norm(LOOK_AT - pos)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, pos
    return c2w


def project(c2w: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (N, 3) -> pixel coordinates (N, 2) and depth along the view direction (N,)."""
    cam = (np.linalg.inv(c2w) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
    depth = -cam[:, 2]
    k = intrinsics()
    return np.c_[k["cx"] + k["fl_x"] * cam[:, 0] / depth, k["cy"] - k["fl_y"] * cam[:, 1] / depth], depth


# ----------------------------------------------------------------------------------------------
# Rendering: one ray per pixel, nearest hit of the ground plane and each (yawed) box
# ----------------------------------------------------------------------------------------------
def _rot_y(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _slab(ob: dict, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray / yawed-box intersection (slab method) for rays dirs (3, N): entry distance (N,) (inf = miss)
    and the entered face's outward normal in world axes (3, N). Axis-major arrays keep numpy fast."""
    rot = _rot_y(ob["yaw"])
    o_local = rot.T @ (origin - np.asarray(ob["center"]))
    d_local = rot.T @ dirs
    d_safe = np.where(np.abs(d_local) < 1e-12, 1e-12, d_local)
    half = (np.asarray(ob["size"]) / 2)[:, None]
    t1, t2 = (-half - o_local[:, None]) / d_safe, (half - o_local[:, None]) / d_safe
    t_near, t_far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_in = np.maximum(np.maximum(t_near[0], t_near[1]), t_near[2])
    t_out = np.minimum(np.minimum(t_far[0], t_far[1]), t_far[2])
    t_in = np.where((t_out >= t_in) & (t_in > 0), t_in, np.inf)  # the cameras are never inside a box
    normal = np.zeros_like(d_local)
    for axis in range(3):  # the slab entered last is the face hit
        face = t_near[axis] == t_in
        normal[axis] = np.where(face, -np.sign(d_local[axis]), 0.0)
    return t_in, rot @ normal


def box_corners(ob: dict) -> np.ndarray:
    """The 8 corners (8, 3) of a yawed box in world coordinates."""
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    return (signs * np.asarray(ob["size"]) / 2) @ _rot_y(ob["yaw"]).T + np.asarray(ob["center"])


def _footprint(ob: dict, c2w: np.ndarray) -> np.ndarray:
    """Flat indices of the pixels inside the projected corners' bounding rectangle (+1 px)."""
    px, depth = project(c2w, box_corners(ob))
    if np.any(depth <= 0):  # never for orbit cameras; be exact rather than fast if it happens
        return np.arange(SIZE[0] * SIZE[1])
    x0, y0 = np.maximum(np.floor(px.min(0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(px.max(0)).astype(int) + 1, [SIZE[0] - 1, SIZE[1] - 1])
    if x1 < x0 or y1 < y0:
        return np.zeros(0, dtype=int)
    return (np.arange(y0, y1 + 1)[:, None] * SIZE[0] + np.arange(x0, x1 + 1)[None, :]).ravel()


def render(objects: Sequence[dict], c2w: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """The RGB view and an object-id map (H, W) int (-1 = ground or sky)."""
    w, h = SIZE
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    cam = np.stack([(u - w / 2) / FOCAL, -(v - h / 2) / FOCAL, -np.ones_like(u)], -1).reshape(-1, 3)
    dirs = c2w[:3, :3] @ cam.T  # (3, N) world ray directions
    origin = c2w[:3, 3]
    with np.errstate(divide="ignore"):
        zbuf = np.where(dirs[1] < 0, -origin[1] / np.minimum(dirs[1], -1e-12), np.inf)
    ground = np.isfinite(zbuf)
    hit = origin[:, None] + dirs * np.where(ground, zbuf, 0)
    checker = (np.floor(hit[0] / 0.5) + np.floor(hit[2] / 0.5)) % 2 == 0
    rgb = np.where(ground[:, None], np.where(checker[:, None], GROUND[0], GROUND[1]), SKY).astype(np.float64)
    ids = np.full(dirs.shape[1], -1)
    normals = np.zeros_like(dirs)
    for i, ob in enumerate(objects):
        idx = _footprint(ob, c2w)  # only the pixels the box can cover
        if idx.size == 0:
            continue
        t_in, normal = _slab(ob, origin, dirs[:, idx])
        nearer = t_in < zbuf[idx]
        zbuf[idx[nearer]], ids[idx[nearer]] = t_in[nearer], i
        normals[:, idx[nearer]] = normal[:, nearer]
    for i, ob in enumerate(objects):  # Lambert shading of each box's visible faces
        mask = ids == i
        rgb[mask] = np.asarray(COLOURS[ob["color"]]) * (0.45 + 0.55 * np.clip(LIGHT @ normals[:, mask], 0, 1))[:, None]
    image = np.clip(np.round(rgb), 0, 255).astype(np.uint8).reshape(h, w, 3)
    return Image.fromarray(image), ids.reshape(h, w)


# ----------------------------------------------------------------------------------------------
# Scenes and questions
# ----------------------------------------------------------------------------------------------
def random_scene(rng: np.random.Generator) -> list[dict]:
    """3-5 boxes of distinct colours, standing on the ground, not overlapping."""
    objects: list[dict] = []
    k = int(rng.integers(3, 6))
    colours = [str(c) for c in rng.choice(list(COLOURS), size=k, replace=False)]
    while len(objects) < k:
        size = [float(rng.uniform(0.4, 0.9)), float(rng.uniform(0.4, 1.2)), float(rng.uniform(0.4, 0.9))]
        xz = rng.uniform(-2.0, 2.0, size=2)
        radius = np.hypot(size[0], size[2]) / 2
        if all(np.hypot(*(xz - np.array([o["center"][0], o["center"][2]]))) > radius + o["radius"] + 0.25
               for o in objects):
            objects.append({"name": f"{colours[len(objects)]} box", "color": colours[len(objects)],
                            "center": [float(xz[0]), size[1] / 2, float(xz[1])], "size": size,
                            "yaw": float(rng.uniform(0, np.pi)), "radius": float(radius)})
    return objects


def _walk_phrase(c2w_a: np.ndarray, c2w_b: np.ndarray, delta: int) -> str:
    if delta == 180:
        return "walk around to the opposite side of the scene"
    side = "right" if np.dot(c2w_b[:3, 3] - c2w_a[:3, 3], c2w_a[:3, 0]) > 0 else "left"
    return f"walk a quarter circle around the scene to your {side}"


def _views(objects: list[dict], cams: list[np.ndarray]):
    """[(image, id map)] per camera, or None unless every centre projects inside every view and each
    object shows >= 30 pixels in each."""
    centres = np.array([o["center"] for o in objects])
    for c2w in cams:  # cheap test first: no render for a scene that leaves the frame
        px, depth = project(c2w, centres)
        inside = (px[:, 0] >= 0.05 * SIZE[0]) & (px[:, 0] <= 0.95 * SIZE[0]) & (px[:, 1] >= 0.05 * SIZE[1]) \
            & (px[:, 1] <= 0.95 * SIZE[1]) & (depth > 0)
        if not inside.all():
            return None
    views = [render(objects, c2w) for c2w in cams]
    if any(np.count_nonzero(ids == i) < 30 for _, ids in views for i in range(len(objects))):
        return None
    return views


def _extreme(values: np.ndarray, largest: bool, margin: float):
    """Index of the smallest (largest) value if it beats the runner-up by `margin`, else None."""
    order = np.argsort(-values if largest else values)
    return int(order[0]) if abs(values[order[0]] - values[order[1]]) >= margin else None


def make_item(bench: str, index: int, seed: int) -> Record:
    """Item `index` of `bench` (dl3dv | viewspatial), from its own random stream."""
    rng = np.random.default_rng([seed, STREAMS[bench], index])
    while True:
        objects = random_scene(rng)
        theta, elevation, radius = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(20, 35)), rng.uniform(6.5, 8.0)
        delta = int(rng.choice([90, -90, 180]))
        c2w_a = orbit_c2w(theta, elevation, radius)
        c2w_b = orbit_c2w(theta + np.radians(delta), elevation, radius)
        views = _views(objects, [c2w_a, c2w_b])
        if views is None:
            continue
        centres = np.array([o["center"] for o in objects])
        px, _ = project(c2w_b, centres)
        cam_b = (np.linalg.inv(c2w_b) @ np.c_[centres, np.ones(len(centres))].T).T  # B's frame: x right, -z ahead
        cols = np.array([np.nonzero(views[1][1] == i)[1].mean() for i in range(len(objects))])
        walk = _walk_phrase(c2w_a, c2w_b, delta)
        if bench == "dl3dv":
            kind = ("leftmost", "rightmost", "closest")[int(rng.integers(3))]
            if kind == "closest":
                pick = _extreme(np.linalg.norm(centres - c2w_b[:3, 3], axis=1), False, 0.4)
            else:
                pick = _extreme(px[:, 0], kind == "rightmost", 0.08 * SIZE[0])
                if pick is not None and pick != int(np.argmax(cols) if kind == "rightmost" else np.argmin(cols)):
                    pick = None  # occlusion moves the visible part: the answer would be debatable
            if pick is None:
                continue
            order = rng.permutation(len(objects))
            letters = "ABCDE"
            candidates = "; ".join(f"{letters[j]}: {objects[o]['name']}" for j, o in enumerate(order))
            answer = letters[int(np.nonzero(order == pick)[0][0])]
            word = {"leftmost": "on the far left", "rightmost": "on the far right", "closest": "closest to you"}[kind]
            question = f"If you {walk} and look back at it, which object will be {word}? "
            extra = {"kind": kind, "answer_object": pick}
        else:
            a, b = (int(x) for x in rng.choice(len(objects), size=2, replace=False))
            # Offsets of a from b in the person's (= camera B's) frame: right, and farther ahead.
            dx, dz = cam_b[a, 0] - cam_b[b, 0], cam_b[b, 2] - cam_b[a, 2]
            if abs(dx) >= max(2 * abs(dz), 0.4) and np.sign(cols[a] - cols[b]) == np.sign(dx):
                relation = "right" if dx > 0 else "left"
            elif abs(dz) >= max(2 * abs(dx), 0.4):
                relation = "front" if dz < 0 else "back"  # front = nearer to the person than b
            else:
                continue
            options = [RELATIONS[k] for k in rng.permutation(4)]
            candidates = "; ".join(f"{'ABCD'[j]}: {o}" for j, o in enumerate(options))
            answer = "ABCD"[options.index(relation)]
            person = walk.replace("walk", "walks", 1).replace("your", "their")
            question = (f"Imagine a person who starts where the camera is, then {person} "
                        f"and faces its centre. From that person's perspective, where is the {objects[a]['name']} "
                        f"relative to the {objects[b]['name']}: to the left, to the right, in front or behind?")
            extra = {"relation": relation, "object": a, "reference": b, "options": options}
        break
    (image, _), (target, _) = views
    meta = {"benchmark": bench, "objects": objects, "intrinsics": intrinsics(), "c2w_a": c2w_a.tolist(),
            "c2w_b": c2w_b.tolist(), "orbit_deg": delta, "azimuth_a": float(theta), "elevation": float(elevation),
            "radius": float(radius), "look_at": LOOK_AT.tolist(), **extra}
    if bench == "dl3dv":
        edit_prompt = PREFIX_3D + "Question: " + question + "Candidates: " + candidates  # as the DL3DV loader
    else:
        edit_prompt = PREFIX_3D + question
    return Record(id=f"{bench}-{index:06d}", family="3d", image=image, question=question, candidates=candidates,
                  answer=answer, answer_type="letter", edit_prompt=edit_prompt, target_image=target, meta=meta)


def generate(n: int, seed: int) -> list[Record]:
    """n DL3DV-style items, then n ViewSpatial (Person-RelDir style) items."""
    from tqdm import tqdm

    return [make_item(bench, i, seed) for bench in STREAMS
            for i in tqdm(range(n), desc=bench, unit="item", disable=None, leave=False)]


def viewspatial_entry(rec: Record, image_path: str) -> dict[str, Any]:
    options = rec.meta["options"]
    k = "ABCD".index(rec.answer)
    return {"question_type": QUESTION_TYPE, "image_path": [image_path], "question": rec.question,
            "answer": f"{rec.answer}. {options[k]}", "choices": "\n".join(f"{'ABCD'[j]}. {o}" for j, o in enumerate(options))}


def export_eval(records: Sequence[Record], out_dir: str | Path) -> dict[str, Path]:
    """<out_dir>/dl3dv.parquet and <out_dir>/viewspatial.json + viewspatial_images/ (see the module docstring)."""
    out_dir = Path(out_dir)
    out: dict[str, Path] = {}
    dl3dv = [r for r in records if r.meta.get("benchmark") == "dl3dv"]
    if dl3dv:
        rows = [{"question": r.question, "candidates": r.candidates, "answer": r.answer,
                 "images": image_cell(r.image_png(), f"{r.id}.png")} for r in dl3dv]
        out["dl3dv"] = write_table(out_dir / "dl3dv.parquet", rows, {"question": "string", "candidates": "string",
                                                                      "answer": "string", "images": "image"})
    views = [r for r in records if r.meta.get("benchmark") == "viewspatial"]
    if views:
        entries = []
        for r in views:
            rel = f"viewspatial_images/{r.id}.png"
            write_if_changed(out_dir / rel, r.image_png())
            entries.append(viewspatial_entry(r, rel))
        atomic_write_text(out_dir / "viewspatial.json", json.dumps(entries, indent=1) + "\n")
        # The same entries as parquet, so that every task of the embedded benchmark is <task>.parquet.
        out["viewspatial"] = write_table(out_dir / "viewspatial.parquet", entries, {
            "question_type": "string", "image_path": "string_list", "question": "string", "answer": "string",
            "choices": "string"})
    return out
