"""Exports: the Hugging Face folders train.py writes at each epoch's end, and what sample.py and
eval.py load. An export holds config.json and safetensors (transformers and vLLM read them), the
tokenizer file with tokenizer_config.json (its added special tokens and the chat template at the
inference condition), for a chat model an ollama Modelfile and a README.md saying how each runtime
is to prompt it, and crlft.json, defined here (ExportInfo) and read nowhere else.

Read top to bottom: crlft.json; writing an export; loading one (or a base, with the dataset it is to
be fine-tuned on) for inference.
"""

import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

import data
from infra.files import read_json, replace_directory, write_json
from infra.hf import load_pretrained, write_hf_checkpoint
from infra.tokenizer_files import check_tokenizer_file
from model import Transformer, default_device, default_dtype

# --------------------------------------------------------------------------------------------------
# crlft.json


@dataclass
class ExportInfo:
    """What an export's crlft.json holds: how to prompt the model (its template, the condition to
    answer under and those it was trained with), the tokenizer it was trained with, and where it
    comes from."""
    template: str
    inference_condition: str
    conditions: list[str]
    sources: list[dict]
    tokenizer_file: str
    tokenizer_sha256: str
    dataset: str
    step: int  # optimizer steps trained; 0 for a base before fine-tuning

    @classmethod
    def of_dataset(cls, meta: dict, dataset, step: int = 0) -> "ExportInfo":
        """Makes the info of a model trained `step` steps on a dataset (its meta.json)."""
        tok = meta["tokenizer"]
        return cls(meta["template"], meta["inference_condition"], meta["conditions"],
                   meta["sources"], tok["file"], tok["sha256"], str(Path(dataset).resolve()), step)


def is_export(folder) -> bool:
    return (Path(folder) / "crlft.json").exists()


def read_export(folder) -> ExportInfo:
    """Reads an export's crlft.json; one that lacks a field is named, with what to do."""
    path = Path(folder) / "crlft.json"
    raw = read_json(path)
    missing = [f.name for f in fields(ExportInfo) if f.name not in raw]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: export the model again with "
                         f"train.py")
    return ExportInfo(**{f.name: raw[f.name] for f in fields(ExportInfo)})


# --------------------------------------------------------------------------------------------------
# Writing an export


def export(model: Transformer, meta: dict, dataset, dtype: str, folder: Path, step: int):
    """Writes an export of a model trained `step` steps on `dataset` (its meta.json: `meta`): every
    rank gathers each parameter, rank 0 writes, beside the folder, then renames it into place when
    complete."""
    rank = dist.get_rank()
    tok = meta["tokenizer"]
    tmp = folder.with_name(f".tmp-{folder.name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    params = dict(model.named_parameters())
    # The end of a turn ends generation; a base pretrained on plain text ("text") ends at EOS.
    eos = tok["special_tokens"].get(data.TEMPLATES[meta["template"]].eot, tok["eos_id"])
    config = replace(model.config, bos_token_id=tok["bos_id"], eos_token_id=eos)
    write_hf_checkpoint(tmp, config, {n: p.shape for n, p in params.items()},
                        lambda n: params[n].full_tensor(), getattr(torch, dtype), write=rank == 0)
    if rank == 0:
        shutil.copyfile(Path(dataset) / tok["file"], tmp / tok["file"])
        tokenizer = data.Tokenizer(tmp / tok["file"], meta["template"])
        write_json(tmp / "tokenizer_config.json", data.tokenizer_config(
            tokenizer, meta["inference_condition"], model.config.max_seq_len))
        if tokenizer.template.eot is not None:  # a chat model: how other runtimes prompt it
            (tmp / "Modelfile").write_text(data.modelfile(tokenizer, meta["inference_condition"]))
            (tmp / "README.md").write_text(model_card(meta, folder.name))
        write_json(tmp / "crlft.json", asdict(ExportInfo.of_dataset(meta, dataset, step)))
        replace_directory(tmp, folder)  # the old export moved aside, the new one in, the old gone
    dist.barrier()


def model_card(meta: dict, name: str) -> str:
    """Returns the README.md of a chat export: how to prompt it in each runtime, which must use its
    template (llama.cpp's built-in templates do not know OpenChat's conditions)."""
    return (f"# {name}: fine-tuned with C-RLFT (OpenChat, arXiv 2309.11235)\n\n"
            f"Prompted with the template {meta['template']} at the condition "
            f"{meta['inference_condition']!r}; trained with {', '.join(meta['conditions'])}.\n\n"
            "- transformers: `apply_chat_template` (tokenizer_config.json holds the template).\n"
            "- llama.cpp: `python convert_hf_to_gguf.py FOLDER --outfile FOLDER/model.gguf`, then "
            "`llama-server -m FOLDER/model.gguf --jinja` (the GGUF holds the template; without it "
            "llama.cpp refuses the template or takes one of its own, with no condition).\n"
            "- ollama, after that conversion: `ollama create NAME -f FOLDER/Modelfile`.\n")


class Exporter:
    """The exports of one run: each epoch's end as exports/epoch-N, a run that ends inside an
    epoch as exports/step-N. `last` is the newest written."""

    def __init__(self, out: Path, model: Transformer, meta: dict, dataset, dtype: str):
        self.folder = out / "exports"
        self.model = model
        self.meta = meta
        self.dataset = dataset
        self.dtype = dtype
        self.last = None

    def name(self, position, plan) -> str | None:
        """Names the export due after the step that ends at `position`, if any."""
        if position.step_in_epoch == len(plan.epochs[position.epoch]):
            return f"epoch-{position.epoch + 1}"
        return f"step-{position.step}" if position.step == plan.total_steps else None

    def after_step(self, position, plan):
        """Writes the export due after this step, if one is."""
        if name := self.name(position, plan):
            self.last = self.folder / name
            export(self.model, self.meta, self.dataset, self.dtype, self.last, position.step)

    def rewrite_unfinished(self, position, plan, log):
        """Writes again the export of the checkpoint resumed from if the run stopped while writing
        it (its crlft.json, written last, is missing)."""
        name = self.name(position, plan)
        if name and not (self.folder / name / "crlft.json").exists():
            log(f"exports/{name} was not finished: exporting it again from the checkpoint of step "
                f"{position.step}")
            self.after_step(position, plan)

    def newest(self) -> Path | None:
        """Finds the newest export already in the run directory."""
        exports = sorted(self.folder.glob("[!.]*"), key=lambda p: p.stat().st_mtime)
        return exports[-1] if exports else None


# --------------------------------------------------------------------------------------------------
# Loading for inference


def load_for_inference(checkpoint, device="auto",
                       dataset="") -> tuple[Transformer, data.Tokenizer, ExportInfo]:
    """Loads an export of train.py, or a base model (a Hugging Face folder with no crlft.json)
    before fine-tuning on `dataset`, prompted with that dataset's tokenizer and template, the
    template's new token rows at the mean of the others as train.py starts them. Its vocabulary
    rows as infra/hf.py's vocabulary_rows says; bf16 on a GPU, float32 on a CPU."""
    folder = Path(checkpoint)
    if is_export(folder):
        info = read_export(folder)
        if dataset and data.load_meta(dataset)["tokenizer"]["sha256"] != info.tokenizer_sha256:
            raise ValueError(f"{dataset} was made with another tokenizer than {folder}'s: --data "
                             f"is for a base model with no crlft.json; leave it out")
        tokenizer_file = folder / info.tokenizer_file
    elif dataset:
        info = ExportInfo.of_dataset(data.load_meta(dataset), dataset)
        tokenizer_file = Path(dataset) / info.tokenizer_file
    else:
        raise ValueError(f"{folder} has no crlft.json: give an export of train.py, or a base "
                         f"with --data")
    tokenizer = data.Tokenizer(tokenizer_file, info.template)
    check_tokenizer_file(tokenizer.path, info.tokenizer_sha256, "the model was trained with")
    device = default_device() if device == "auto" else torch.device(device)
    model = load_pretrained(folder, device, default_dtype(device), tokenizer,
                            from_base=not is_export(folder))
    return model, tokenizer, info
