"""Bring the peer libraries' own test suites into ``tests/peer/_suites/`` (git-ignored), pinned and checked.

hf_ext's models, trainer, tuner and pipeline are tested with the test mixins that transformers, TRL, PEFT and
diffusers run on their own classes. Those files are not ours and are not committed: this script brings them in,
byte for byte, and checks each against the sha256 pinned in :data:`SUITES`, so a run always tests against the
suite of the installed version and never against a hand-edited copy.

Sources, per suite:

1. **PyPI source distribution** of the installed version (``pip download --no-deps --no-binary :all:``), its
   archive and every extracted file checked against their pins. transformers and PEFT ship (part of) their tests
   this way.
2. **A copy of the library's repository** given with ``--source LIB=DIR``: a git checkout or a bare git directory
   (files are read at the pinned commit; a checkout without it gives its working tree's files) or a plain folder
   holding the files at their repository paths. Every pinned file must be there. This is
   for the files the sdist does not ship: transformers' ``tests/generation/test_utils.py`` (GenerationTesterMixin),
   ``tests/exporters/test_export.py`` and ``tests/utils/test_configuration_utils.py``; TRL and diffusers ship no
   tests in their sdists at all. PyPI is the only network this project's CI reaches, so there these files are
   absent unless a copy is at hand.

A suite whose files are not all present is written without them; hf_ext's tests that need a missing file skip
with a reason naming the file and this command (``tests/peer/peer_suites.py``). For transformers, whose
``test_modeling_common.py`` imports the three modules the sdist omits, a missing module is replaced by the small
stand-in in :data:`STAND_INS` (written by this script, marked as such): ``ModelTesterMixin`` then runs without
the export tests, and ``GenerationTesterMixin`` is a marker that makes hf_ext's generation test classes skip.

Usage::

    python tests/peer/fetch_peer_tests.py                      # everything PyPI has, for the installed versions
    python tests/peer/fetch_peer_tests.py --source trl=/path/to/trl --source diffusers=/path/to/diffusers
    python tests/peer/fetch_peer_tests.py --print-hashes --source ...   # new pins after an upgrade

The pins are per version: when an installed version has no pins, the script stops and says which. To move to a
new version, set the suite's ``version`` (and ``commit``) in :data:`SUITES`, read the diff of the peer's tests, and
take the new pins from ``--print-hashes``; a file is added to a suite by adding its path to ``sdist_files`` or
``repo_files`` (with any hash) before that run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SUITES_DIR = Path(__file__).resolve().parent / "_suites"


@dataclass(frozen=True)
class Suite:
    """One peer library's test files at one version.

    Args:
        library: the distribution name, as ``pip`` and ``importlib.metadata`` know it.
        version: the installed version these pins are for.
        package: the import name the suite gets under ``tests/peer/_suites`` (its ``tests/`` folder renamed).
        sdist_sha256: sha256 of the PyPI source distribution, or ``None`` when the sdist ships none of the files.
        sdist_files: repository path -> sha256, for files taken from the sdist.
        repo: ``owner/name`` on GitHub, where ``--source`` copies come from.
        commit: the commit of ``repo`` that ``repo_files`` are pinned at.
        repo_files: repository path -> sha256, for files taken from ``--source``.
        namespace_aliases: folder under ``_suites`` -> folder of the suite it stands for, for a peer file that
            imports a sibling by the absolute name its repository gives it (``tests.exporters``). The alias has no
            ``__init__.py``, so it joins the ``tests`` namespace package pytest makes of hf_ext's own tests folder.
    """

    library: str
    version: str
    package: str
    sdist_sha256: str | None
    sdist_files: dict[str, str]
    repo: str
    commit: str
    repo_files: dict[str, str] = field(default_factory=dict)
    namespace_aliases: dict[str, str] = field(default_factory=dict)


SUITES: dict[str, Suite] = {
    "transformers": Suite(
        library="transformers",
        version="5.25.0",
        package="transformers_tests",
        sdist_sha256="9120226c6bf170d69abc3029036799bb5d48e552f7127646a529a5c9309812e2",
        sdist_files={
            "tests/test_modeling_common.py": "b76190b86d67b334d474eb2d043dfa695caf45a3ceab68bc08ebf4280784abb4",
            "tests/test_configuration_common.py": "a8ac6455ff1bc085c147de71930a3bf57eb4e1ff880102ccaa627477b1f111e4",
        },
        # No copy of huggingface/transformers at v5.25.0 could be had here (the repository is over the size a
        # snapshot may have); these two come from the synced fork zucchini-nlp/transformers at decba1d (main,
        # 2026-08-19, 5.16.0.dev0), the newest copy found whose imports resolve on 5.25.0. Its
        # tests/utils/test_configuration_utils.py imports httpx, which huggingface_hub 2.x replaced, so that one
        # stays the stand-in below.
        repo="zucchini-nlp/transformers",
        commit="decba1d2ea4ed3cbf0495d1828abad4b2dba1846",
        repo_files={
            "tests/generation/test_utils.py": "9c3b4bce16f6ae1dbf97901e0b9b1eda4db9edf56e5f7fb7308ec2b32a42f966",
            "tests/exporters/test_export.py": "d205f597d055c81dd892a775a727d62a51a6bbd33ff2af36fd2ff02db02e02e2",
        },
        # generation/test_utils.py imports `tests.exporters.test_export` by that absolute name.
        namespace_aliases={"tests/exporters": "exporters"},
    ),
    "peft": Suite(
        library="peft",
        version="0.21.2",
        package="peft_tests",
        sdist_sha256="b803ccfb3f3f316004d850284306687833a2235ea278fb56abc856203456142e",
        sdist_files={
            "tests/testing_common.py": "8dbd9db362130cae88a127eaed4e19d95a652be1e259bcaf6dc6dbe03e31f2da",
            "tests/testing_utils.py": "157a4243f2404a942f54fa51489e25409bda365a35828931be172547852cb017",
            "tests/test_decoder_models.py": "accb15cc235bba7e35c66712d7a0bc42eb54c6245af51b77a201a78b68ac31e9",
            "tests/test_encoder_decoder_models.py": "6e59ca9bcb5a338166d90fabcc74baad615e4b9a916758955d7c2564da9660f4",
            "tests/test_feature_extraction_models.py": "c309ca0391b69c74ce60100d0a9e411e98ce44a54888b179a536cb4dfd6b7c6e",
            "tests/test_seq_classifier.py": "176217a34e7d82b554576c990a57798607afa8777aa10fe1b8c05b7841270207",
        },
        repo="huggingface/peft",
        commit="",
    ),
    "trl": Suite(
        library="trl",
        version="1.16.0",
        package="trl_tests",
        sdist_sha256=None,
        sdist_files={},
        repo="huggingface/trl",
        commit="f2cd57710ae345ea6428ae95363267fcf38a3dc8",
        repo_files={
            "tests/__init__.py": "575c2f27f11ee91a39f126cc5d0a8eec51befe3bc2a72ea4077d7fed6b65ebc0",
            "tests/conftest.py": "a443a76d3816077613893cf25aaa9699a0ce623bfcf7b2df435a8336ff68cf66",
            "tests/test_dpo_trainer.py": "eb4b27626abfe9dd4594fcaa003f9de36af3c5e59beeb90ae9b79ffd933b72cc",
            "tests/testing_utils.py": "1786d0a83e6fe5c28e5f8f1daaab957ff1d7b4d624b42403fb33143eb04d0172",
        },
    ),
    "diffusers": Suite(
        library="diffusers",
        version="0.42.1",
        package="diffusers_tests",
        sdist_sha256=None,
        sdist_files={},
        repo="huggingface/diffusers",
        commit="58eb52c0803ea9af3abec60841c2a093bdf1f951",
        repo_files={
            "tests/models/autoencoders/vae.py": "cafb77d5410f02e32157ce904c01d20393cc32b394dfc72487f4853e7a4823b2",
            "tests/models/test_modeling_common.py": "d0aad65e34a09aafc743c0e3bf086f8195b73420c6507e41393f59dd8c397cab",
            "tests/models/testing_utils/__init__.py": "01e9ad6c07f063ce9ec6ff43b088b8ab4e146821eb3c36fefeba8bd0722b8e60",
            "tests/models/testing_utils/attention.py": "0e201b75b3469e7a76f118f0c923cd463028a5b23d1d73c990ac3dce5395bb9c",
            "tests/models/testing_utils/cache.py": "eef4b139f91ba41a9bf10063bbd320ef37350844f9eca5ce60838baf0bac9c45",
            "tests/models/testing_utils/common.py": "ce3aed4897c1e44c7f590145b9e697834f1e09edb08ebdefe0c98ebe22d1ba2c",
            "tests/models/testing_utils/compile.py": "1344298cc2968021105e54f068174b6ec14210691359c5442dbb818c9dede296",
            "tests/models/testing_utils/ip_adapter.py": "082d823c9f94a47c868611723d38cca017fa41229bd87bdd3ac9574beaa93a4a",
            "tests/models/testing_utils/lora.py": "64dfd69581d13f5082374b444e26676cb3e5ecec4d0ccd96ddc4acdd752f7ef7",
            "tests/models/testing_utils/memory.py": "e92fd7ff3c4f0b0adb020f75cb133aaf7754d9f2cde0963a0051c5a7aaa44076",
            "tests/models/testing_utils/parallelism.py": "687ec3ed5ffcd1e8244579d4f28fc8ded3e587b97a3b26cfaa1d620597087d77",
            "tests/models/testing_utils/quantization.py": "a70e9041c5f4403d62fd134c35d6f086698dc9946c7bb9becbc73040abc0a094",
            "tests/models/testing_utils/single_file.py": "89b80c1d8b59248c3f9a1876f7f14338f7bedcfa6113def81c29ac9af1e75c5d",
            "tests/models/testing_utils/training.py": "9a570c05548ca06c7892cae786b55dc76f110cc0abe4ac6f70f6e95dcb156466",
            "tests/models/testing_utils/utils.py": "704079ef020b1055f72f4227adce9a54f33f557d3959b07d25b4af3aa06a417f",
            "tests/models/transformers/test_models_transformer_flux.py": "95dce2501043bce5178f8bd51102c2385416201e7950b3be1de3bdaa3a10b634",
            "tests/models/unets/test_models_unet_2d_condition.py": "2534a85b9a6f1e193a942d35fe6c80654df4dc141c9df743f450a6edf57bab1b",
            "tests/others/test_utils.py": "ffb1e09b3fb3e2663ab9a0415e8cb73f3066fe30b39d219d64e02cea080a7cec",
            "tests/pipelines/test_pipelines_common.py": "dd67377323dd6869c69cabbe8988d2d281af0c5397c5c9b0f7404c4426340a64",
            "tests/schedulers/test_schedulers.py": "4e41c6c4863061cc40edf14cdcfbaffa624249592d1f5b3711cca6087293dc02",
            "tests/testing_utils.py": "317d6206b602f94bdb86e508d86b630a446864720ff7fed446965cb940f4acf3",
        },
    ),
}

# Written in place of a transformers module the sdist does not ship, only when no --source copy provides it.
# Each is hf_ext's own minimal stand-in, not transformers' code; `HF_EXT_STAND_IN` marks it.
STAND_INS: dict[str, dict[str, str]] = {
    "transformers": {
        "tests/exporters/test_export.py": (
            '"""hf_ext stand-in: transformers 5.25.0\'s sdist does not ship tests/exporters/test_export.py.\n\n'
            "ModelTesterMixin derives from ExportTesterMixin; without the real file the export tests do not run.\n"
            '"""\n\nHF_EXT_STAND_IN = True\n\n\nclass ExportTesterMixin:\n    pass\n'
        ),
        "tests/generation/test_utils.py": (
            '"""hf_ext stand-in: transformers 5.25.0\'s sdist does not ship tests/generation/test_utils.py.\n\n'
            "hf_ext's generation test classes see HF_EXT_STAND_IN and skip, naming the missing file.\n"
            '"""\n\nHF_EXT_STAND_IN = True\n\n\nclass GenerationTesterMixin:\n    pass\n'
        ),
        "tests/utils/test_configuration_utils.py": (
            '"""hf_ext stand-in: transformers 5.25.0\'s sdist does not ship tests/utils/test_configuration_utils.py.\n\n'
            "ConfigTester.check_config_arguments_init sets these PreTrainedConfig arguments (those of its 5.25.0\n"
            "signature) to non-default values and checks that the config keeps them; the values are hf_ext's choice.\n"
            '"""\n\nHF_EXT_STAND_IN = True\n\n'
            "config_common_kwargs = {\n"
            '    "return_dict": False,\n'
            '    "output_hidden_states": True,\n'
            '    "dtype": "float16",\n'
            '    "chunk_size_feed_forward": 5,\n'
            '    "architectures": ["BertModel"],\n'
            '    "id2label": {0: "label"},\n'
            '    "label2id": {"label": "0"},\n'
            '    "problem_type": "regression",\n'
            "}\n"
        ),
    },
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_installed(suite: Suite) -> None:
    """Stop, saying what to do, unless the installed version of ``suite.library`` is the one its files are pinned for."""
    try:
        installed = importlib.metadata.version(suite.library)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{suite.library} is not installed; its suite is pinned for {suite.version}.") from None
    if installed != suite.version:
        raise SystemExit(
            f"{suite.library}: the pinned suite is for {suite.version}, installed is {installed}. Install "
            f"{suite.library}=={suite.version}, or pin {installed}'s files: set SUITES[{suite.library!r}].version "
            f"to {installed!r} in {Path(__file__).name} and take the new pins from --print-hashes."
        )


def download_sdist(suite: Suite, workdir: Path, check: bool) -> bytes:
    """The suite's sdist from PyPI (pip's index settings apply), checked against its pin when ``check``."""
    requirement = f"{suite.library}=={suite.version}"
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    if subprocess.run([*command, "--dest", str(workdir), requirement]).returncode != 0:
        raise SystemExit(
            f"{suite.library}: pip could not download the source distribution {requirement} (its error is above). "
            f"This step needs PyPI, or an index that holds the sdist; `--only` fetches the other suites."
        )
    (archive,) = workdir.iterdir()  # a fresh folder, one requirement without its dependencies
    data = archive.read_bytes()
    if check and sha256(data) != suite.sdist_sha256:
        raise SystemExit(f"{archive.name}: sha256 {sha256(data)} does not match the pin {suite.sdist_sha256}.")
    if not check:
        print(f"{suite.library}\t{archive.name}\t{sha256(data)}")
    return data


def read_sdist_files(archive: bytes, wanted: set[str]) -> dict[str, bytes]:
    """The ``wanted`` files of the sdist, by repository path (the sdist's top folder stripped)."""
    found = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            path = member.name.split("/", 1)[-1]
            if path in wanted and member.isfile():
                found[path] = tar.extractfile(member).read()
    return found


_BUILTIN_MARKS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def pytest_markers(files: dict[str, bytes]) -> list[str]:
    """The pytest markers the suite's files apply (``@pytest.mark.generate``, ``@mark.flash_attn_test``, ...),
    for tests/conftest.py to register: the peers declare some in their own conftest or not at all, and hf_ext's
    pytest runs with ``--strict-markers``."""
    used = set()
    for path, data in files.items():
        if path.endswith(".py"):
            used.update(re.findall(r"\bmark\.([A-Za-z_]\w*)", data.decode(errors="replace")))
    return [f"{name}: applied by the peer's own tests" for name in sorted(used - _BUILTIN_MARKS)]


def read_source_file(source: Path, suite: Suite, path: str) -> bytes:
    """``path`` from a --source copy: from git at the pinned commit where ``source`` is a git directory or checkout
    that has it, else from the folder itself."""
    git_dir = source / ".git" if (source / ".git").exists() else source
    shown = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{suite.commit}:{path}"], capture_output=True)
    if shown.returncode == 0:
        return shown.stdout
    if (source / path).is_file():
        return (source / path).read_bytes()
    raise SystemExit(
        f"--source {suite.library}={source}: {path} is neither in git at the pinned commit {suite.repo}@{suite.commit} "
        f"nor in that folder."
    )


def gather(suite: Suite, source: Path | None, workdir: Path, check: bool) -> tuple[dict[str, bytes], list[str], list[str]]:
    """The files of ``suite`` its sources provide (checked against their pins when ``check``), the missing ones,
    and the pytest markers they apply."""
    files: dict[str, bytes] = {}
    if suite.sdist_sha256 is not None:
        archive = download_sdist(suite, workdir, check)
        files.update(read_sdist_files(archive, set(suite.sdist_files)))
    if source is not None:
        files.update({path: read_source_file(source, suite, path) for path in suite.repo_files})
    pins = {**suite.sdist_files, **suite.repo_files}
    if check:
        wrong = [f"{path}: sha256 {sha256(data)} (pinned {pins[path]})" for path, data in files.items() if sha256(data) != pins[path]]
        if wrong:
            raise SystemExit(
                f"{suite.library}: files differ from their pins (the sdist of {suite.version}; --source files at "
                f"{suite.repo}@{suite.commit}):\n  " + "\n  ".join(wrong)
            )
    return files, sorted(set(pins) - set(files)), pytest_markers(files)


def write_suite(suite: Suite, files: dict[str, bytes], missing: list[str], markers: list[str]) -> Path:
    """Write the files as package ``suite.package`` (the repository's ``tests/`` renamed), replacing the old one
    whole."""
    from hf_ext.atomic import atomic_folder

    root = SUITES_DIR / suite.package
    stand_ins = {p: t.encode() for p, t in STAND_INS.get(suite.library, {}).items() if p not in files}
    with atomic_folder(root, overwrite=True, arg="suite") as staging:
        for path, data in {**stand_ins, **files}.items():
            target = staging / Path(path).relative_to("tests")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            (folder / "__init__.py").touch()
        manifest = [f"{suite.library} {suite.version}"]
        manifest += [f"missing {path}" for path in missing]
        manifest += [f"stand-in {path}" for path in sorted(stand_ins)]
        (staging / "MANIFEST.txt").write_text("\n".join(manifest) + "\n")
        (staging / "markers.txt").write_text("".join(f"{marker}\n" for marker in markers))
    for alias, target in suite.namespace_aliases.items():
        link = SUITES_DIR / alias
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        if (root / target).is_dir():  # relative, so the folder may move
            link.symlink_to(os.path.relpath(root / target, link.parent), target_is_directory=True)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", action="append", default=[], metavar="LIB=DIR", help="a copy of LIB's repository")
    parser.add_argument("--only", action="append", choices=sorted(SUITES), help="fetch these suites only")
    parser.add_argument("--print-hashes", action="store_true", help="print the files' sha256 instead of checking them")
    args = parser.parse_args(argv)
    sources = dict(_parse_source(s) for s in args.source)
    unknown = set(sources) - set(SUITES)
    if unknown:
        parser.error(f"--source names unknown libraries {sorted(unknown)}; known: {sorted(SUITES)}")

    SUITES_DIR.mkdir(exist_ok=True)
    (SUITES_DIR / ".gitignore").write_text("*\n")
    for name in args.only or sorted(SUITES):
        suite = SUITES[name]
        check_installed(suite)
        with tempfile.TemporaryDirectory() as workdir:
            files, missing, markers = gather(suite, sources.get(name), Path(workdir), check=not args.print_hashes)
        if args.print_hashes:
            for path, data in sorted(files.items()):
                print(f"{name}\t{path}\t{sha256(data)}")
            continue
        root = write_suite(suite, files, missing, markers)
        note = f"; missing {len(missing)}: {', '.join(missing)}" if missing else ""
        print(f"{name} {suite.version}: {len(files)} files -> {root}{note}")
    return 0


def _parse_source(text: str) -> tuple[str, Path]:
    library, sep, folder = text.partition("=")
    if not sep or not folder:
        raise SystemExit(f"--source takes LIB=DIR, got {text!r}.")
    path = Path(folder).expanduser()
    if not path.exists():
        raise SystemExit(f"--source {library}: {path} does not exist.")
    return library, path


if __name__ == "__main__":
    sys.exit(main())
