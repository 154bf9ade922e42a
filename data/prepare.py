"""Data preparation at scale: image shards and motion masks as Apache Beam pipelines.

    python -m mtss_train.data.prepare images --input GLOB --output DIR [--shards N]
        [--min_side PX] [--max_pixels N] [--jpeg_quality Q] [BEAM OPTIONS]
    python -m mtss_train.data.prepare masks --videos GLOB --output DIR [--shards N]
        [extractor settings, as python -m mtss_train.data.motion_masks] [BEAM OPTIONS]

An optional extra: `pip install 'mtss-train[beam]'`. `images` is described in
`prepare_images`, `masks` in `prepare_masks`; both write TFRecord shards and a manifest
that the trainer reads directly (`--data DIR`, `--task_param ms.data=DIR`). GLOB is a
glob or a directory (searched recursively); paths go through tf.io.gfile, so gs:// and
other filesystems TensorFlow supports work where the workers can reach them.

Every option this command does not know goes to Beam, e.g. for 2 local processes
`--direct_num_workers=2 --direct_running_mode=multi_processing`, or
`--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp ...`.
Without `--runner`, pipelines run on Beam's FnApiRunner: the engine Beam's DirectRunner uses
for batch pipelines, named here because DirectRunner first tries to download (from GitHub)
and start the Prism runner, which ignores `--direct_num_workers`.

Local worker processes log at INFO whatever the options say (FnApiRunner does not hand them
the pipeline options), and each prints TensorFlow's load notices: unless `--verbose`, the
command passes on only their warnings and errors (BEAM_WORKER_NOISE).
"""

from mtss_train import startup  # First: quiets TensorFlow and FFmpeg start-up logs.

import argparse
import dataclasses
import re
import sys
import typing

from mtss_train.errors import DataError, cli_main

DEFAULT_RUNNER = "FnApiRunner"
DEFAULT_SHARDS = 16
# Lines local Beam workers print that say nothing to a user: their INFO and DEBUG records
# (Python logging's default format), and two warnings every worker start gives.
BEAM_WORKER_NOISE = re.compile(r"^(INFO|DEBUG):|apitools not found, and bigquery client libraries are not available"
                               r"|No semi_persistent_directory found")


def _parser() -> argparse.ArgumentParser:
    from mtss_train.data import motion_masks
    from mtss_train.data.motion_saliency import MaskSettings
    from mtss_train.data.prepare_images import ImageSettings

    parser = argparse.ArgumentParser(prog="python -m mtss_train.data.prepare", allow_abbrev=False,
                                     description="Prepare training data with Apache Beam; unknown "
                                     "options go to Beam (e.g. --runner, --direct_num_workers).")
    commands = parser.add_subparsers(dest="command", required=True)
    images = commands.add_parser("images", allow_abbrev=False, help="images -> TFRecord shards for --data")
    images.add_argument("--input", required=True, help="A glob, or a directory searched for jpg/jpeg/png.")
    masks = commands.add_parser("masks", allow_abbrev=False, help="videos -> frame+mask shards for the ms task")
    masks.add_argument("--videos", required=True, help="A glob, or a directory searched for videos.")
    for command in (images, masks):
        command.add_argument("--output", required=True, help="Output directory; a rerun replaces it.")
        command.add_argument("--shards", type=int, default=DEFAULT_SHARDS,
                             help="TFRecord files to write (aim for 100-200 MB each).")
        command.add_argument("--verbose", action="store_true",
                             help="Show everything Beam's worker processes and TensorFlow print (INFO lines included).")
    images.add_argument("--min_side", type=int, default=ImageSettings.min_side,
                        help="Skip images with a side below this (px, after resizing).")
    images.add_argument("--max_pixels", type=int, default=0,
                        help="Shrink larger images to at most this many pixels, aspect kept (0: keep sizes).")
    images.add_argument("--jpeg_quality", type=int, default=ImageSettings.jpeg_quality,
                        help="JPEG quality of re-encoded images (resized, or neither JPEG nor PNG).")
    # The extractor's settings, with the command's flag names, defaults and help texts.
    helps = motion_masks._settings_help()  # One source of help text for both drivers.
    for field in dataclasses.fields(MaskSettings):
        kind = type(field.default) if field.default is not None else int
        masks.add_argument(f"--{field.name}", type=kind, default=field.default, help=helps.get(field.name, ""))
    return parser


def _beam_options(beam_args: list[str]):
    """Beam pipeline options from the arguments this command does not know."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(beam_args)
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = DEFAULT_RUNNER
    return options


def _mask_settings(args: argparse.Namespace):
    from mtss_train.data.motion_saliency import MaskSettings

    values = {}
    for field in dataclasses.fields(MaskSettings):
        value = getattr(args, field.name)
        if type(None) in typing.get_args(field.type) and value == 0:
            value = None  # 0 on the command line means "no limit", as for the extractor command.
        values[field.name] = value
    return MaskSettings(**values)


def _run_images(args: argparse.Namespace, options) -> None:
    from mtss_train.data.prepare_images import SKIP_REASONS, ImageSettings, prepare_images

    settings = ImageSettings(args.min_side, args.max_pixels or None, args.jpeg_quality)
    manifest = prepare_images(args.input, args.output, args.shards, settings, options)
    summary = manifest["summary"]
    skipped = ", ".join(f"{reason} {summary['skipped'][reason]}" for reason in SKIP_REASONS)
    print(f"{summary['written']} of {summary['listed']} images written to {args.output} in {args.shards} "
          f"shards; skipped: {skipped} (files named in {args.output}/manifest.json)")
    if not summary["written"]:
        raise DataError(f"none of the {summary['listed']} file(s) matching {args.input} is a usable image "
                        f"(see {args.output}/manifest.json)")


def _run_masks(args: argparse.Namespace, options) -> None:
    from mtss_train.data.prepare_masks import prepare_masks

    manifest = prepare_masks(args.videos, args.output, args.shards, _mask_settings(args), options)
    summary = manifest["summary"]
    dropped = ", ".join(f"{reason} {count}" for reason, count in summary["dropped"].items())
    print(f"{summary['videos']} videos ({summary['ok']} ok, {summary['skipped']} skipped); "
          f"{summary['frames_kept']} of {summary['frames_read']} frames kept; dropped: {dropped}; "
          f"written to {args.output} in {args.shards} shards")
    for name, error in list(manifest["skipped_videos"].items())[:10]:
        print(f"  skipped {name}: {error}")
    if summary["skipped"] > 10:
        print(f"  ... and {summary['skipped'] - 10} more (see {args.output}/manifest.json)")
    if not summary["ok"]:
        raise DataError(f"none of the {summary['videos']} video(s) matching {args.videos} could be read "
                        f"(see {args.output}/manifest.json)")


def main(argv: list[str]) -> None:
    """Runs `images` or `masks` (see the module docstring); argv[0] is the program."""
    args, beam_args = _parser().parse_known_args(argv[1:])
    options = _beam_options(beam_args)
    run = _run_images if args.command == "images" else _run_masks
    if args.verbose:
        run(args, options)
        return
    tensorflow_notices = startup.TensorFlowLoadNotices()
    with startup.filtered_stderr(lambda line: not BEAM_WORKER_NOISE.search(line) and tensorflow_notices.keep(line)):
        run(args, options)


if __name__ == "__main__":
    cli_main(main)(sys.argv)
