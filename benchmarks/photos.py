"""A folder of real photos as JPEGs at 300-500 px (and its webdataset shards), made from photos packages ship.

    python benchmarks/photos.py --out photos --count 4096 [--shards 64] [--odd 0]

The photos are scikit-learn's two sample images (china.jpg and flower.jpg, 427x640, in its
wheel) and, when scikit-image is installed (and ``--photos all``), the colour photos of ``skimage.data`` that ship in
its wheel. Each photo is one class; each sample is a seeded random crop of its photo (a quarter
to all of its area, aspect 3:4 to 4:3), resized so that its longer side is 300 to 500 px and
saved as a baseline JPEG at quality 80 to 95, in ``OUT/images/<class>/<n>.jpg``. That is the
shape of a real photo dataset (varied sizes and aspect ratios, 4:2:0 JPEGs of tens of kB), not
28 px images upscaled. ``--odd N`` adds N files of each kind the GPU decoder does not take (PNG,
palette PNG, 16-bit PNG, CMYK JPEG), to exercise the device path's fallback. ``--shards K``
also writes the folder as K webdataset shards in ``OUT/shards/`` (``kdcache make-shards``).

The same command and seed give the same bytes.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

#: scikit-image's colour photos that ship in its wheel (no download).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
ODD_KINDS = ("png", "palette", "png16", "cmyk")


def source_photos(which: str = "all") -> dict[str, Image.Image]:
    """{class name: RGB photo}: scikit-learn's two, then (``which="all"``) scikit-image's colour photos if it is installed."""
    from sklearn.datasets import load_sample_images

    found = load_sample_images()
    photos = {Path(name).stem: Image.fromarray(image) for name, image in zip(found.filenames, found.images)}
    if which == "sklearn":
        return photos
    try:
        import skimage.data
    except ImportError:
        return photos
    for name in SKIMAGE_PHOTOS:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a photo this version does not ship, or would download
            continue
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            photos[name] = Image.fromarray(image)
    return photos


def random_view(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of a quarter to all of the photo's area, aspect 3:4 to 4:3, resized to a longer side of 300-500 px."""
    width, height = photo.size
    for _ in range(20):
        area = rng.uniform(0.25, 1.0) * width * height
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        w, h = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if w <= width and h <= height:
            break
    else:
        w, h = width, height
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    crop = photo.crop((left, top, left + w, top + h))
    longer = int(rng.integers(300, 501))
    scale = longer / max(w, h)
    return crop.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def odd_bytes(image: Image.Image, kind: str) -> tuple[bytes, str]:
    """(bytes, suffix) of an image in a form the GPU decoder does not take."""
    out = io.BytesIO()
    if kind == "png":
        image.save(out, format="PNG")
    elif kind == "palette":
        image.convert("P", palette=Image.Palette.ADAPTIVE).save(out, format="PNG")
    elif kind == "png16":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(out, format="PNG")
    elif kind == "cmyk":
        image.convert("CMYK").save(out, format="JPEG", quality=90)
        return out.getvalue(), ".jpg"
    else:
        raise ValueError(f"unknown odd kind {kind!r}")
    return out.getvalue(), ".png"


def make_photos(out: str | Path, *, count: int, seed: int = 0, odd: int = 0, which: str = "all") -> Path:
    """Write ``count`` JPEG samples (plus ``odd`` of each odd kind) to ``OUT/images``; returns that folder."""
    images = Path(out) / "images"
    if images.exists():
        raise SystemExit(f"{images} exists; choose a new --out")
    photos = source_photos(which)
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    for n in range(count):
        name = names[n % len(names)]
        view = random_view(photos[name], rng)
        path = images / name / f"{n:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        view.save(path, format="JPEG", quality=int(rng.integers(80, 96)))
    for kind in ODD_KINDS:
        for n in range(odd):
            name = names[n % len(names)]
            data, suffix = odd_bytes(random_view(photos[name], rng), kind)
            path = images / name / f"odd-{kind}-{n:03d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--odd", type=int, default=0, help="files of each kind the GPU decoder does not take")
    parser.add_argument("--shards", type=int, default=0, help="also write this many webdataset shards")
    parser.add_argument("--photos", choices=("all", "sklearn"), default="all",
                        help="sklearn: scikit-learn's two photos only (two classes on every machine)")
    args = parser.parse_args()
    images = make_photos(args.out, count=args.count, seed=args.seed, odd=args.odd, which=args.photos)
    files = sorted(p for p in images.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"{len(files)} images in {len(list(images.iterdir()))} classes in {images} ({size / len(files) / 1024:.1f} kB each)")
    if args.shards:
        from kdcache.shards import write_shards
        from kdcache.sources import open_source

        source = open_source(f"imagefolder:{images}")
        per_shard = -(-len(source) // args.shards)
        pattern = str(Path(args.out) / "shards" / "photos-%06d.tar")
        (Path(args.out) / "shards").mkdir(parents=True, exist_ok=True)
        paths = write_shards(source, pattern, samples_per_shard=per_shard, image_format="jpg")
        print(f"{len(paths)} webdataset shards in {Path(args.out) / 'shards'}")


if __name__ == "__main__":
    main()
