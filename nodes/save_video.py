"""Save Video (Stream): writes a Parallel Tiled VAE Decode (Stream) to a file as batches arrive.

Files go under ComfyUI's output folder only, named by ComfyUI's own path helper (the same prefix
rules and counter as Save Image and Save Video). An interrupted or failed save removes what it had
written: no truncated file is left behind.
"""
from __future__ import annotations

import json
import os

import folder_paths
from comfy.cli_args import args
from ..parallel_vae import audio as sound
from ..parallel_vae import video
from ..parallel_vae.errors import InputError
from ._api import io
from .progress import send_text
from .stream import STREAM, check_stream
from .video_types import PngSequenceVideo, VideoFromFile, VideoInput

FORMATS = list(video.FORMATS)


def output_folder(prefix: str, width: int = 0, height: int = 0):
    """ComfyUI's get_save_image_path, with its error for a prefix that escapes the output folder
    turned into one naming the input."""
    output_dir = folder_paths.get_output_directory()
    try:
        return folder_paths.get_save_image_path(prefix, output_dir, width, height)
    except Exception as e:
        raise InputError("filename_prefix", f"{prefix!r} would save outside ComfyUI's output folder "
                                            f"({output_dir}); use a name or a subfolder inside it") from e


class ParallelVAESaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        outputs = [io.Video.Output(tooltip="The saved video (mp4/webm: the file; png: the frames, read back "
                                           "when a node asks).")] if VideoInput is not None else []
        return io.Schema(
            node_id="ParallelVAESaveVideo",
            display_name="Save Video (Stream)",
            category="image/video",
            description="Saves a Parallel Tiled VAE Decode (Stream) to ComfyUI's output folder while it decodes: "
                        "mp4 (H.264), webm (VP9) or a lossless PNG sequence, with sound when audio is given. "
                        "Memory stays flat however long the video is. An interrupted save removes its partial "
                        "files.",
            inputs=[
                STREAM.Input("frames", tooltip="Frames from Parallel Tiled VAE Decode (Stream)."),
                io.String.Input("filename_prefix", default="parallel_vae/video",
                                tooltip="File name inside ComfyUI's output folder; may hold subfolders and "
                                        "%date:...% like Save Image, never leave the output folder."),
                io.Float.Input("fps", default=16.0, min=0.01, max=1000.0, step=1.0,
                               tooltip="Frames per second (Wan: 16, most others 24)."),
                io.Combo.Input("format", options=FORMATS, default="mp4",
                               tooltip="mp4: H.264 (plays everywhere). webm: VP9. png: one lossless 8-bit PNG "
                                       "per frame, byte-identical to Save Image."),
                io.Int.Input("crf", default=19, min=0, max=video.CRF_MAX,
                             tooltip="Quality for mp4 (0..51) and webm (0..63): lower is better and bigger. "
                                     "Ignored for png."),
                io.Audio.Input("audio", optional=True,
                               tooltip="Sound for the video: AAC in mp4, Opus in webm, a FLAC file beside a png "
                                       "sequence. It starts with the first frame and is cut at the video's end "
                                       "(frames / fps); shorter audio leaves the rest silent. Of a batch, item 0 "
                                       "is used, as core's Create Video does. Mono, stereo or 5.1 (FLAC: up to 8 "
                                       "channels); resampled to 48 kHz only where the codec needs it."),
            ],
            outputs=outputs,
            hidden=[io.Hidden.unique_id, io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None, fps=None, format=None, crf=None):
        try:
            if None not in (format, fps, crf):
                video.check_options(format, fps, crf)
            elif format is not None and format not in FORMATS:
                raise InputError("format", f"{format!r} is not one of {', '.join(FORMATS)}")
            if filename_prefix is not None:
                output_folder(filename_prefix)
        except InputError as e:
            return str(e)
        return True

    @classmethod
    def _metadata(cls) -> dict[str, str]:
        if args.disable_metadata or cls.hidden is None:
            return {}
        meta = {}
        if cls.hidden.prompt is not None:
            meta["prompt"] = json.dumps(cls.hidden.prompt)
        for key, value in (cls.hidden.extra_pnginfo or {}).items():
            meta[key] = json.dumps(value)
        return meta

    @classmethod
    def execute(cls, frames, filename_prefix, fps, format, crf, audio=None) -> io.NodeOutput:
        source = check_stream(frames)
        video.check_options(format, fps, crf)
        track = sound.check(audio, format)
        width, height = source.size
        folder, name, counter, subfolder, _ = output_folder(filename_prefix, width, height)
        writer = video.VideoWriter(folder, f"{name}_{counter:05}_", format, fps, crf, cls._metadata(), track)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        try:
            with source.open() as stream:
                for batch in stream:
                    writer.write(batch.frames)
                    send_text(f"saved {writer.frames}/{batch.total} frames", node_id)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        pictures = [f for f in files if not f.endswith(".flac")]
        saved = [{"filename": f, "subfolder": subfolder, "type": "output"} for f in pictures]
        ui = {"images": saved} if format == "png" else {"images": saved, "animated": (True,)}
        flac = [os.path.join(folder, f) for f in files if f.endswith(".flac")]
        if flac:  # the editor's audio player, as Save Audio shows it
            ui["audio"] = [{"filename": os.path.basename(flac[0]), "subfolder": subfolder, "type": "output"}]
        if VideoInput is None:
            return io.NodeOutput(ui=ui)
        paths = [os.path.join(folder, f) for f in pictures]
        out = (PngSequenceVideo(paths, fps, (width, height), flac[0] if flac else None) if format == "png"
               else VideoFromFile(paths[0]))
        return io.NodeOutput(out, ui=ui)
