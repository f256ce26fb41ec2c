"""Train the mini Qwen2-Audio's projector (encoder and LLM frozen): ``python scripts/train_projector.py STAGE``.

Stages (each resumable; ``--work`` holds everything, default ``<cache>/mini_train``):

- ``prepare``: synthetic speech of everyday English. Texts: Debian's ``fortunes`` files (``--text-dir``; one
  to three short quotes per clip), the demo set's texts held out (none of its sentences is used, and quotes sharing
  a 6-word run with one are dropped); a seeded split keeps ``--n-eval`` clips for held-out evaluation. Voice: piper
  (en_US-joe-medium, the demo's voice) at a random rate (length scale 0.75..1.3), phoneme and duration noise,
  gain, and white noise at 10..40 dB SNR on half the clips. Each clip is then run once through the frozen audio
  tower exactly as the stock model sees it (80-mel features of a 30 s padded window, the tower's 750 pooled
  positions cut to the clip's audio tokens, 25 per second) and stored as float16 ``[tokens, 512]``.
- ``train``: the projector (stock linear 512 -> 896) on those features: the input is the adapter's own prompt
  text (``<|audio_bos|><|AUDIO|>...<|audio_eos|>Detect the language and recognize the speech: <|en|>``) with the
  projected features in place of the placeholders, the loss is cross-entropy on the transcript and
  ``<|endoftext|>``. AdamW, seeded, batch ``--batch``; the LLM in bfloat16 (``--dtype``). Every ``--eval-every``
  steps: held-out loss and greedy WER on ``--n-wer`` held-out clips; ``curve.jsonl`` and ``curve.png`` are
  rewritten and a checkpoint saved (``--resume`` is automatic). Stops after ``--steps`` or ``--minutes``.
- ``publish``: copy the latest projector and its record (data recipe, steps, seconds, curve, commit) into
  ``src/speech_redundancy/models/mini_projector/``, where ``model=mini_qwen2audio`` finds it.

Threads: ``--threads`` (default 1) for a shared machine; run under ``nice -n 19``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FORTUNE_FILES = ("people", "wisdom", "food", "kids", "work", "love", "pets", "education", "family", "fortunes",
                 "men-women", "miscellaneous", "politics", "sports", "literature", "humorists", "medicine")
RECIPE_VERSION = 1
TRAIN_SETTINGS = ("seed", "threads", "dtype", "batch", "lr", "warmup", "steps", "minutes", "eval_every",
                  "wer_every_evals", "n_eval_loss", "n_wer", "n_clips", "n_eval")


# ----------------------------------------------------------------------------- texts
def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def fortune_texts(folder: Path) -> list[str]:
    """Short quotes (4..30 words, plain ASCII prose, no attributions) from Debian's fortunes files."""
    out = []
    for name in FORTUNE_FILES:
        f = folder / name
        if not f.is_file():
            continue
        for entry in f.read_text(encoding="latin-1").split("\n%\n"):
            lines = [ln for ln in entry.strip().splitlines() if not ln.strip().startswith(("--", "-- "))]
            text = " ".join(" ".join(lines).split())
            if not text or not text.isascii() or re.search(r"[<>{}\[\]|\\/_@#$%^*=~`0-9]", text):
                continue
            if ":" in text or '"' in text[1:-1] or text.count("(") or text.isupper():
                continue
            if 4 <= len(words(text)) <= 30:
                out.append(text)
    return sorted(set(out))


def demo_texts() -> list[str]:
    from speech_redundancy.data.demo import SENTENCES
    from speech_redundancy.paths import cache_dir

    texts = [t for t in SENTENCES.read_text().splitlines() if t.strip()]
    manifest = cache_dir() / "demo" / "manifest.jsonl"
    if manifest.is_file():
        texts += [json.loads(line)["text"] for line in manifest.read_text().splitlines() if line.strip()]
    return texts


def held_out_filter(texts: list[str], held: list[str], n: int = 6) -> list[str]:
    """``texts`` without any that shares an ``n``-word run with a held-out text."""
    grams = set()
    for t in held:
        w = words(t)
        grams |= {tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}
    return [t for t in texts if not any(tuple(words(t)[i:i + n]) in grams
                                        for i in range(max(1, len(words(t)) - n + 1)))]


# ----------------------------------------------------------------------------- prepare
def prepare(args) -> None:
    import onnxruntime
    import soxr
    import torch
    from piper import PiperVoice
    from piper.config import PiperConfig, SynthesisConfig

    from speech_redundancy.data.demo import voice_files
    from speech_redundancy.paths import cache_dir
    from speech_redundancy.models import mini_qwen2audio as mq
    from speech_redundancy.models.qwen2audio import audio_tokens_for

    torch.set_num_threads(args.threads)
    work = args.work
    (work / "clips").mkdir(parents=True, exist_ok=True)
    texts = held_out_filter(fortune_texts(args.text_dir), demo_texts())
    rng = random.Random(args.seed)
    rng.shuffle(texts)
    plan_file = work / "plan.json"
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
    else:  # clips of 1..3 quotes under 25 s of speech; the first n_eval are held out
        plan, i = [], 0
        while i < len(texts) and len(plan) < args.n_clips:
            k = rng.choice((1, 1, 2, 2, 3))
            plan.append({"id": f"c{len(plan):05d}", "text": " ".join(texts[i:i + k]),
                         "split": "eval" if len(plan) < args.n_eval else "train",
                         "length_scale": round(rng.uniform(0.75, 1.3), 3),
                         "noise_scale": round(rng.uniform(0.4, 0.9), 3), "noise_w": round(rng.uniform(0.5, 1.0), 3),
                         "gain": round(rng.uniform(0.3, 0.9), 3),
                         "snr_db": round(rng.uniform(10, 40), 1) if rng.random() < 0.5 else None,
                         "seed": rng.randrange(2**31)})
            i += k
        plan_file.write_text(json.dumps(plan, indent=0))
    onnx, config = voice_files(cache_dir() / "voices")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = args.threads
    onnxruntime.set_seed(args.seed)
    session = onnxruntime.InferenceSession(str(onnx), sess_options=options, providers=["CPUExecutionProvider"])
    voice = PiperVoice(session=session, config=PiperConfig.from_dict(json.loads(Path(config).read_text())))
    tower, fe = mq.build_tower()
    start, done = time.perf_counter(), 0
    for n, item in enumerate(plan):
        out = work / "clips" / f"{item['id']}.npz"
        if out.is_file():
            continue
        syn = SynthesisConfig(length_scale=item["length_scale"], noise_scale=item["noise_scale"],
                              noise_w_scale=item["noise_w"], volume=1.0)
        audio = np.concatenate([c.audio_float_array for c in voice.synthesize(item["text"], syn)])
        audio = soxr.resample(audio, voice.config.sample_rate, 16000).astype(np.float32)
        pad = np.zeros(int(0.2 * 16000), np.float32)
        audio = np.concatenate([pad, audio, pad])
        audio = item["gain"] * audio / max(1e-6, float(np.abs(audio).max()))
        if item["snr_db"] is not None:
            noise = np.random.default_rng(item["seed"]).standard_normal(len(audio)).astype(np.float32)
            power = float(np.mean(audio ** 2))
            audio = audio + noise * math.sqrt(power / 10 ** (item["snr_db"] / 10))
        audio = np.clip(audio, -1, 1)
        if len(audio) > 30 * 16000:
            continue
        feats = fe(audio, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
        with torch.no_grad():
            hidden = tower(feats["input_features"]).last_hidden_state[0]
        tokens = audio_tokens_for(len(audio))
        np.savez(out, features=hidden[:tokens].to(torch.float16).numpy(),
                 audio=(audio * 32767).astype(np.int16))
        done += 1
        rate = (time.perf_counter() - start) / done
        print(f"prepare {n + 1}/{len(plan)} {item['id']} {len(audio) / 16000:.1f}s {tokens} tokens "
              f"({rate:.2f} s/clip)", flush=True)


# ----------------------------------------------------------------------------- train
class Trainer:
    def __init__(self, args):
        import torch

        from speech_redundancy.models import mini_qwen2audio as mq
        from speech_redundancy.models.qwen2audio import AUDIO_TOKEN

        torch.set_num_threads(args.threads)
        self.args, self.torch = args, torch
        self.dtype = getattr(torch, args.dtype)
        model, processor = mq.build(projector="untrained", dtype=torch.float32)
        self.tok = processor.tokenizer
        self.llm = model.model.language_model.to(self.dtype).eval()
        self.head = model.lm_head.to(self.dtype)
        for p in [*self.llm.parameters(), *self.head.parameters(), *model.model.audio_tower.parameters()]:
            p.requires_grad_(False)
        self.projector = model.model.multi_modal_projector.linear.float()
        embed = self.llm.embed_tokens.weight
        g = torch.Generator().manual_seed(args.seed)  # output at the scale of the text embeddings
        with torch.no_grad():
            std = float(embed[:151643].float().std())
            self.projector.weight.copy_(torch.randn(self.projector.weight.shape, generator=g) * std / math.sqrt(512))
            self.projector.bias.zero_()
        self.projector.requires_grad_(True)
        from speech_redundancy.data.records import Utterance
        from speech_redundancy.models.base import Request
        from speech_redundancy.models.qwen2audio import Qwen2AudioModel

        adapter = Qwen2AudioModel(model, processor, name="mini", prompt_family="qwen2_audio")
        text = adapter.prompt_text(Request(utt=Utterance(id="x", audio="", text="", duration=1.0), audio=None))
        before, after = text.split(AUDIO_TOKEN)
        self.prompt_text = text
        self.before = torch.tensor(self.tok(before, add_special_tokens=False).input_ids)
        self.after = torch.tensor(self.tok(after, add_special_tokens=False).input_ids)
        self.eos = self.tok.convert_tokens_to_ids("<|endoftext|>")
        self.stops = set(model.generation_config.eos_token_id)
        self.scan()
        self.opt = torch.optim.AdamW(self.projector.parameters(), lr=args.lr, weight_decay=0.0)
        self.step, self.seconds, self.rng = 0, 0.0, random.Random(args.seed)
        self.state_file = args.work / "state.pt"
        if self.state_file.is_file():
            s = torch.load(self.state_file, weights_only=False)
            self.projector.load_state_dict(s["projector"])
            self.opt.load_state_dict(s["opt"])
            self.step, self.seconds = s["step"], s["seconds"]
            self.rng.setstate(s["rng"])
            print(f"resumed at step {self.step} ({self.seconds:.0f} s)", flush=True)

    def scan(self) -> None:
        """The clips ``prepare`` has finished, by split (in plan order)."""
        work = self.args.work
        self.items = {"train": [], "eval": []}
        for item in json.loads((work / "plan.json").read_text()):
            if (work / "clips" / f"{item['id']}.npz").is_file():
                self.items[item["split"]].append(item)

    def features(self, item):
        return self.torch.from_numpy(np.load(self.args.work / "clips" / f"{item['id']}.npz")["features"]).float()

    def embeds(self, item, with_target: bool):
        """(input embeddings [T, d], labels [T] or None) of one clip."""
        torch = self.torch
        emb = self.llm.embed_tokens
        audio = self.projector(self.features(item)).to(self.dtype)
        parts = [emb(self.before), audio, emb(self.after)]
        labels = None
        if with_target:
            target = torch.tensor(self.tok(item["text"], add_special_tokens=False).input_ids + [self.eos])
            parts.append(emb(target))
            prefix = sum(p.shape[0] for p in parts[:3])
            labels = torch.full((prefix + len(target),), -100)
            labels[prefix - 1:-1] = target  # position t predicts token t+1
        return torch.cat(parts), labels

    def loss(self, batch):
        torch = self.torch
        seqs = [self.embeds(item, True) for item in batch]
        n = max(e.shape[0] for e, _ in seqs)
        d = seqs[0][0].shape[1]
        x = torch.zeros(len(seqs), n, d, dtype=self.dtype)
        mask = torch.zeros(len(seqs), n, dtype=torch.long)
        labels = torch.full((len(seqs), n), -100)
        for i, (e, lab) in enumerate(seqs):  # right padding
            x[i, :len(e)], mask[i, :len(e)], labels[i, :len(e)] = e, 1, lab
        hidden = self.llm(inputs_embeds=x, attention_mask=mask).last_hidden_state
        keep = labels != -100
        logits = self.head(hidden[keep]).float()  # the LM head on target positions only
        return torch.nn.functional.cross_entropy(logits, labels[keep])

    def greedy(self, item, max_new: int = 40) -> str:
        torch = self.torch
        with torch.no_grad():
            x, _ = self.embeds(item, False)
            out = self.llm(inputs_embeds=x[None], use_cache=True)
            cache, ids = out.past_key_values, []  # (the output field keeps its old name; the keyword is cache=)
            for _ in range(max_new):
                nxt = int(self.head(out.last_hidden_state[0, -1]).argmax())
                if nxt in self.stops:
                    break
                ids.append(nxt)
                out = self.llm(inputs_embeds=self.llm.embed_tokens(torch.tensor([[nxt]])), cache=cache,
                               use_cache=True)
                cache = out.past_key_values
        return self.tok.decode(ids, skip_special_tokens=True)

    def evaluate(self) -> dict:
        torch = self.torch
        from speech_redundancy.metrics import corpus_wer

        items = self.items["eval"]
        with torch.no_grad():
            losses = [float(self.loss([it])) for it in items[: self.args.n_eval_loss]]
        out = {"eval_loss": round(float(np.mean(losses)), 4)}
        if self.args.n_wer and (self.step % (self.args.eval_every * self.args.wer_every_evals) == 0):
            refs, hyps, examples = [], [], []
            for it in items[: self.args.n_wer]:
                hyp = self.greedy(it)
                refs.append(it["text"])
                hyps.append(hyp)
                examples.append({"ref": it["text"], "hyp": hyp})
            out["eval_wer"] = round(100 * corpus_wer(refs, hyps)["wer"], 2)
            out["examples"] = examples[:3]
        return out

    def save(self, curve: list[dict]) -> None:
        torch = self.torch
        torch.save({"projector": self.projector.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "seconds": self.seconds, "rng": self.rng.getstate(),
                    "args": {k: v for k, v in vars(self.args).items() if k in TRAIN_SETTINGS}}, self.state_file)
        write_curve(self.args.work, curve)

    def run(self) -> None:
        torch, args = self.torch, self.args
        curve_file = args.work / "curve.jsonl"
        curve = [json.loads(x) for x in curve_file.read_text().splitlines()] if curve_file.is_file() else []
        curve = [c for c in curve if c["step"] <= self.step]
        train = self.items["train"]
        print(f"train: {len(train)} clips, eval: {len(self.items['eval'])} clips, dtype {args.dtype}, "
              f"batch {args.batch}, lr {args.lr}", flush=True)
        if self.step == 0:
            curve.append({"step": 0, "seconds": 0.0, **self.evaluate()})
            print(json.dumps(curve[-1]), flush=True)
            self.save(curve)
        deadline = time.perf_counter() + 60 * args.minutes
        recent = []
        while self.step < args.steps and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            batch = self.rng.sample(train, min(args.batch, len(train)))
            lr = args.lr * min(1.0, (self.step + 1) / args.warmup)
            for group in self.opt.param_groups:
                group["lr"] = lr
            loss = self.loss(batch)
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.projector.parameters(), 1.0)
            self.opt.step()
            self.step += 1
            self.seconds += time.perf_counter() - t0
            recent.append(float(loss.detach()))
            print(f"step {self.step} loss {recent[-1]:.3f} lr {lr:.2e} {time.perf_counter() - t0:.1f} s/step "
                  f"({self.seconds / 60:.1f} min)", flush=True)
            if self.step % args.eval_every == 0:
                self.scan()  # clips that ``prepare`` (still running) finished since
                curve.append({"step": self.step, "seconds": round(self.seconds, 1),
                              "train_loss": round(float(np.mean(recent)), 4), **self.evaluate()})
                recent = []
                print(json.dumps(curve[-1]), flush=True)
                self.save(curve)
        if recent:
            curve.append({"step": self.step, "seconds": round(self.seconds, 1),
                          "train_loss": round(float(np.mean(recent)), 4)})
        self.save(curve)


def write_curve(work: Path, curve: list[dict]) -> None:
    (work / "curve.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curve))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for key, style in (("train_loss", "-"), ("eval_loss", "--")):
        pts = [(c["step"], c[key]) for c in curve if key in c]
        if pts:
            ax[0].plot(*zip(*pts), style, marker=".", label=key)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("cross-entropy")
    ax[0].legend()
    pts = [(c["step"], c["eval_wer"]) for c in curve if "eval_wer" in c]
    if pts:
        ax[1].plot(*zip(*pts), marker="o")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("held-out synthetic WER (%)")
    fig.suptitle("mini Qwen2-Audio projector training (encoder and LLM frozen)")
    fig.tight_layout()
    fig.savefig(work / "curve.png", dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- publish
def publish(args) -> None:
    import torch
    from safetensors.torch import save_file

    from speech_redundancy.models import mini_qwen2audio as mq

    s = torch.load(args.work / "state.pt", weights_only=False)
    dest = mq.PROJECTOR_DIR
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in s["projector"].items()}, str(dest / mq.PROJECTOR_FILE))
    shutil.copy(args.work / "curve.jsonl", dest / "curve.jsonl")
    shutil.copy(args.work / "curve.png", dest / "curve.png")
    plan = json.loads((args.work / "plan.json").read_text())
    have = [p for p in plan if (args.work / "clips" / f"{p['id']}.npz").is_file()]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record = {
        "recipe_version": RECIPE_VERSION, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "steps": s["step"], "train_seconds": round(s["seconds"], 1), "settings": s.get("args"),
        "data": {"texts": f"Debian fortunes 1:1.99.1-7.3 files {list(FORTUNE_FILES)}, 4..30-word quotes, 1..3 "
                          "per clip; demo texts held out (no shared 6-word run)",
                 "voice": "piper-tts 1.8.0 en_US-joe-medium; length scale 0.75..1.3, noise 0.4..0.9, noise_w "
                          "0.5..1.0, gain 0.3..0.9, white noise 10..40 dB SNR on half",
                 "train_clips": sum(p["split"] == "train" for p in have),
                 "eval_clips": sum(p["split"] == "eval" for p in have),
                 "train_audio_seconds": round(sum(
                     len(np.load(args.work / "clips" / f"{p['id']}.npz")["features"]) for p in have
                     if p["split"] == "train") / 25, 1)},
        "curve": "curve.jsonl", "machine": args.machine, "command": args.command,
    }
    (dest / mq.RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"published step {s['step']} to {dest}")


def main(argv=None) -> int:
    from speech_redundancy.paths import cache_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["prepare", "train", "publish"])
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--text-dir", type=Path, default=Path("/usr/share/games/fortunes"))
    p.add_argument("--n-clips", type=int, default=1200)
    p.add_argument("--n-eval", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--wer-every-evals", type=int, default=2)
    p.add_argument("--n-eval-loss", type=int, default=16)
    p.add_argument("--n-wer", type=int, default=12)
    p.add_argument("--machine", default="", help="publish: where and how it ran (for the record)")
    p.add_argument("--command", default="", help="publish: the train command line (for the record)")
    args = p.parse_args(argv)
    args.work = args.work or cache_dir() / "mini_train"
    if args.stage == "prepare":
        prepare(args)
    elif args.stage == "train":
        Trainer(args).run()
    else:
        publish(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
