"""Demo data: real head MRI volumes fetched from package registries, pinned and sha256-checked.

Sources (see ``data_manifests/README.md`` for licences):

* PyPI ``nimare==0.22.1`` wheel: MNI152NLin6Asym T1 (with skull) + brain mask at 1 and 2 mm.
* PyPI ``nilearn==0.14.1`` wheel: ICBM152 2009a T1 (brain only).
* Debian ``mricron-data=1.2.20211006+dfsg-4``: Colin27 ``ch2`` (T1 with skull) + ``ch2bet`` (its brain),
  and the INIA19 macaque T1. Debian is needed for the test subject; without ``apt-get`` (non-Debian
  systems) put the ``.deb`` into ``<cache>/demo/downloads/`` yourself.

Files land in ``<cache>/demo/`` (``$SAMADAPT_CACHE`` or ``~/.cache/samadapt``); the packaged manifests
point there through ``${SAMADAPT_CACHE}``. Reruns verify the files and need no network.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from samadapt.data.manifest import cache_root
from samadapt.errors import UserError, one_line
from samadapt.io import atomic_path, sha256_file, write_text


@dataclass(frozen=True)
class Source:
    kind: str  # "pypi" or "debian"
    name: str
    version: str
    archive: str
    sha256: str
    members: dict  # path inside the archive → (file name in <cache>/demo, sha256)


SOURCES = (
    Source("pypi", "nimare", "0.22.1", "nimare-0.22.1-py3-none-any.whl",
           "16025cbe44c97fb580fe129df230fca62c97c2c6197887abc83b6081552e7bc1", {
               "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz": (
                   "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
                   "fbb6e77a6b090368db105d1cab2c13abd141815998b85c95a520d09771f0021c"),
               "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz": (
                   "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz",
                   "895cc1e3d13fa00eacf1659bea51a10b384d8bc1d2d751f9a1e131509194c9c9"),
               "nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz": (
                   "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz",
                   "1616e98b88c0b213096e015d12f7a114648851989215493ba5799c76c19fd1f5"),
               "nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz": (
                   "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz",
                   "5e12ef73afaf8e2bf17ab855a82ca13bf36473ae11f0888c4c8978eb63a1a51b"),
           }),
    Source("pypi", "nilearn", "0.14.1", "nilearn-0.14.1-py3-none-any.whl",
           "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a", {
               "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz": (
                   "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                   "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6"),
           }),
    Source("debian", "mricron-data", "1.2.20211006+dfsg-4", "mricron-data_1.2.20211006+dfsg-4_all.deb",
           "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f", {
               "./usr/share/mricron/templates/ch2.nii.gz": (
                   "ch2.nii.gz", "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309"),
               "./usr/share/mricron/templates/ch2bet.nii.gz": (
                   "ch2bet.nii.gz", "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1"),
               "./usr/share/mricron/templates/inia19-t1-brain.nii.gz": (
                   "inia19-t1-brain.nii.gz", "3f0707f4999a0c6b56d6c9a0145310cba17753e2b4612f577d8dbfe65a89e231"),
           }),
)
# Colin27 brain mask = ch2bet > 0 on ch2's grid; pinned by the sha256 of its uint8 (z, y, x) voxels.
CH2_MASK = "ch2_brain_mask.nii.gz"
CH2_MASK_VOXELS_SHA256 = "c4e0d9fc8289cea373f2c6e7391378490ba212e90062b3aa99fb38e3f57543eb"
# The test subject at 2 mm isotropic (image linear, mask nearest; SimpleITK's Resample on the same extent):
# half the slices of the 1 mm volume, so every demo row — LiteMedSAM's encoder takes ~1.7 s a slice on two
# cores — is scored on the same held-out head within the demo's time. Pinned by their voxels' sha256.
CH2_2MM = {"ch2.nii.gz": ("ch2_2mm.nii.gz", "linear",
                          "f40ac14da67e730e64b8918460cf5406e8daa996bff5ed1eb9be4ebc2d4812be"),
           CH2_MASK: ("ch2_brain_mask_2mm.nii.gz", "nearest",
                      "113b51d2a340a81e95232d8e0aa2b84199e954134ddf9fda3ee24b4d31550030")}


def demo_dir(root: Path | None = None) -> Path:
    return Path(root or cache_root()) / "demo"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_demo_data(root: Path | None = None, log: Callable[[str], None] = _stderr) -> Path:
    """Fetch (if needed) and verify every demo file; returns ``<cache>/demo``.

    Safe when several processes start at once (``accelerate launch`` ranks, parallel test workers): the
    first takes a file lock and fetches, the others wait for it and then find every file valid."""
    from filelock import FileLock

    folder = demo_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".fetch.lock")):
        for source in SOURCES:
            missing = {member: target for member, target in source.members.items()
                       if not _valid(folder / target[0], target[1])}
            if missing:
                archive = _fetch(source, folder / "downloads", log)
                _extract(source, archive, missing, folder, log)
        _derive_ch2_mask(folder, log)
        _derive_ch2_2mm(folder, log)
    return folder


def _valid(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _fetch(source: Source, downloads: Path, log: Callable[[str], None]) -> Path:
    archive = downloads / source.archive
    if _valid(archive, source.sha256):
        return archive
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{source.name}=={source.version}" if source.kind == "pypi" else f"{source.name}={source.version}"
    log(f"demo: downloading {spec} from {'PyPI' if source.kind == 'pypi' else 'Debian (apt-get download)'} ...")
    if source.kind == "pypi":
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", spec,
              "-d", str(downloads)], spec, downloads)
    else:
        if shutil.which("apt-get") is None:
            raise UserError(f"demo: {spec} (the Colin27 test subject) comes from Debian but apt-get is not "
                            f"available — download {source.archive} and put it into {downloads}")
        try:
            _run(["apt-get", "download", spec], spec, downloads, cwd=downloads)
        except UserError:
            if os.geteuid() != 0:
                raise
            log("demo: refreshing the apt package lists (apt-get update) and retrying ...")
            subprocess.run(["apt-get", "update"], capture_output=True, check=False)
            _run(["apt-get", "download", spec], spec, downloads, cwd=downloads)
    if not archive.is_file():
        raise UserError(f"demo: {spec} was downloaded but {archive} is missing")
    digest = sha256_file(archive)
    if digest != source.sha256:
        archive.unlink()
        raise UserError(f"demo: {archive.name} has sha256 {digest[:12]}..., expected {source.sha256[:12]}... "
                        "— the registry served a different file; deleted it, rerun to retry")
    return archive


def _run(command: list[str], spec: str, downloads: Path, cwd: Path | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = one_line(lines[-1]) if lines else f"exit code {result.returncode}"
        raise UserError(f"demo: could not download {spec} ({reason}) — check the network, or put the file "
                        f"into {downloads}")


def _extract(source: Source, archive: Path, members: dict, folder: Path, log: Callable[[str], None]) -> None:
    log(f"demo: extracting {len(members)} file(s) from {archive.name}")
    if source.kind == "pypi":
        with zipfile.ZipFile(archive) as wheel:
            contents = {member: wheel.read(member) for member in members}
    else:
        with tarfile.open(fileobj=io.BytesIO(_deb_data(archive)), mode="r:*") as tar:
            contents = {member: tar.extractfile(member).read() for member in members}
    for member, (name, sha256) in members.items():
        data = contents[member]
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise UserError(f"demo: {member} in {archive.name} has sha256 {digest[:12]}..., expected {sha256[:12]}...")
        with atomic_path(folder / name) as tmp:
            tmp.write_bytes(data)


def _deb_data(deb: Path) -> bytes:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive), without needing dpkg."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise UserError(f"{deb}: not a Debian package")
    position = 8
    while position + 60 <= len(raw):
        header = raw[position:position + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        start = position + 60
        if name.startswith("data.tar"):
            return raw[start:start + size]
        position = start + size + (size % 2)
    raise UserError(f"{deb}: no data.tar member — corrupt package, delete it and rerun")


def _derive_ch2_mask(folder: Path, log: Callable[[str], None]) -> None:
    import numpy as np
    import SimpleITK as sitk

    target, stamp = folder / CH2_MASK, folder / (CH2_MASK + ".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == sha256_file(target):
        return
    log(f"demo: deriving {CH2_MASK} = ch2bet > 0")
    reference = sitk.ReadImage(str(folder / "ch2.nii.gz"))
    mask = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "ch2bet.nii.gz"))) > 0).astype(np.uint8)
    digest = hashlib.sha256(np.ascontiguousarray(mask).tobytes()).hexdigest()
    if digest != CH2_MASK_VOXELS_SHA256:
        raise UserError(f"demo: derived {CH2_MASK} voxels have sha256 {digest[:12]}..., expected "
                        f"{CH2_MASK_VOXELS_SHA256[:12]}... — delete {folder} and rerun")
    image = sitk.GetImageFromArray(mask)
    image.CopyInformation(reference)
    with atomic_path(target) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    write_text(stamp, sha256_file(target) + "\n")


def _derive_ch2_2mm(folder: Path, log: Callable[[str], None]) -> None:
    import numpy as np
    import SimpleITK as sitk

    for source, (name, interpolation, voxels_sha256) in CH2_2MM.items():
        target, stamp = folder / name, folder / (name + ".sha256")
        if target.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == sha256_file(target):
            continue
        log(f"demo: deriving {name} = {source} at 2 mm")
        image = sitk.ReadImage(str(folder / source))
        size = [int(round(n * s / 2.0)) for n, s in zip(image.GetSize(), image.GetSpacing())]
        method = sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor
        resampled = sitk.Resample(image, size, sitk.Transform(), method, image.GetOrigin(), (2.0, 2.0, 2.0),
                                  image.GetDirection(), 0, image.GetPixelID())
        digest = hashlib.sha256(np.ascontiguousarray(sitk.GetArrayFromImage(resampled)).tobytes()).hexdigest()
        if digest != voxels_sha256:
            raise UserError(f"demo: derived {name} voxels have sha256 {digest[:12]}..., expected "
                            f"{voxels_sha256[:12]}... — delete {folder} and rerun")
        with atomic_path(target) as tmp:
            sitk.WriteImage(resampled, str(tmp), useCompression=True)
        write_text(stamp, sha256_file(target) + "\n")


def demo_files(root: Path | None = None) -> list[Path]:
    """Every file the demo manifests use."""
    folder = demo_dir(root)
    return ([folder / name for source in SOURCES for name, _ in source.members.values()] + [folder / CH2_MASK]
            + [folder / name for name, _, _ in CH2_2MM.values()])
