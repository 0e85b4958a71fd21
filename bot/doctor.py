"""``python -m bot doctor``: check the set-up and say how to fix each problem.

Exit code 0 when everything needed to run is in place, 1 otherwise.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bot.secrets_filter import mask
from engine.config import DEFAULT_CONFIG_PATH, Config, ModelSection
from engine.moderation import INSTALL_HINT, missing_packages
from engine.store import journal_size_bytes

if TYPE_CHECKING:
    from engine.flux.presets import MemoryPlan

# What @BotFather hands out: the bot's id, a colon, and a 35-character secret.
TELEGRAM_TOKEN = re.compile(r"\d{5,20}:[A-Za-z0-9_-]{30,60}")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def run_doctor(config: Config, config_path: str | None, *, print_fn=print,  # type: ignore[no-untyped-def]
               quick: bool = False) -> int:
    if quick:  # the container's health check: is the bot alive (never the GPU or network)
        checks = [check_database(config), check_heartbeat(config)]
    else:
        checks = [check_config(config_path), *check_tokens(config, config_path),
                  check_database(config), check_output_dir(config)]
        if config.moderation.nsfw_check:
            checks.append(check_moderation(config))
        if config.engine.backend == "flux":
            from engine.flux.gpu_probe import probe_gpu

            gpu = probe_gpu(config.model.device)  # once: it also runs a float8 matmul
            checks += [check_gpu(config, gpu), *check_plan(config, gpu), *check_models(config)]
        else:
            checks.append(Check("backend", True, "dry-run: no GPU or model files needed"))
        if config.cluster.url:
            from bot.doctor_cluster import check_cluster  # it uses this module's Check

            checks += check_cluster(config)
    for check in checks:
        mark = "ok " if check.ok else "FAIL"
        print_fn(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok and check.fix:
            print_fn(f"       fix: {check.fix}")
    problems = sum(not c.ok for c in checks)
    print_fn("All good." if not problems else f"{problems} problem(s) found.")
    return 1 if problems else 0


def check_moderation(config: Config) -> Check:
    """``[moderation] nsfw_check``: the detector's packages are there (nothing is loaded)."""
    missing = missing_packages()
    if missing:
        return Check("NSFW check", False, f"nsfw_check = true but {', '.join(missing)} "
                     "not installed: the bot will not start", INSTALL_HINT)
    mod = config.moderation
    overrides = len(mod.discord_guilds) + len(mod.telegram_chats)
    return Check("NSFW check", True, f"NudeNet installed; flagged images: {mod.policy} "
                 f"({overrides} per-chat override(s)), threshold {mod.threshold:g}")


def check_config(config_path: str | None) -> Check:
    path = Path(config_path) if config_path else DEFAULT_CONFIG_PATH
    if not path.exists():
        return Check("config", True, f"no {path}: using the defaults of config.example.toml")
    return Check("config", True, f"read {path}")


def check_tokens(config: Config, config_path: str | None) -> list[Check]:
    checks = []
    for platform, token, env in (("discord", config.discord_token, "DISCORD_TOKEN"),
                                 ("telegram", config.telegram_token, "TELEGRAM_TOKEN")):
        source = "environment" if os.environ.get(env) else "config"
        detail = f"token {mask(token)} from the {source}" if token else "no token (adapter off)"
        if platform == "telegram" and token and not TELEGRAM_TOKEN.fullmatch(token):
            checks.append(Check("telegram token", False, f"{detail} does not look like a bot "
                                "token (digits, a colon, then 35 letters, digits, - or _)",
                                "copy the whole token @BotFather gave you"))
            continue
        checks.append(Check(f"{platform} token", True, detail))
    if not (config.discord_token or config.telegram_token):
        checks.append(Check("adapters", True, "no chat token set: `run` starts the console"))
    path = Path(config_path) if config_path else DEFAULT_CONFIG_PATH
    if path.exists() and (config.discord.token or config.telegram.token):
        mode = path.stat().st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            checks.append(Check("config file", False,
                                f"{path} holds a token and others can read it",
                                f"chmod 600 {path}"))
    return checks


def check_database(config: Config) -> Check:
    path = Path(config.engine.database)
    if not path.exists():
        parent = _existing_parent(path)
        if os.access(parent, os.W_OK):
            return Check("database", True, f"{path} will be created")
        return Check("database", False, f"cannot create {path}: {parent} is not writable",
                     f"make {parent} writable or set engine.database")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            result = db.execute("PRAGMA quick_check").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        return Check("database", False, f"{path} cannot be read: {exc}",
                     "move the file away; a new journal will be created")
    if result != "ok":
        return Check("database", False, f"{path} is damaged: {result}",
                     "move the file away; a new journal will be created")
    return Check("database", True,
                 f"{path} (schema v{version}, {_size(journal_size_bytes(path))})")


# A running bot touches its heartbeat every 30 s; three missed beats mean it hangs.
HEARTBEAT_STALE_S = 120.0


def check_heartbeat(config: Config, now: float | None = None) -> Check:
    import time

    from bot.app import heartbeat_path

    path = heartbeat_path(config)
    if not path.exists():
        return Check("heartbeat", False, f"no {path}: the bot is not serving (yet)",
                     "start it with `python -m bot run`; loading the models takes minutes")
    age = (now if now is not None else time.time()) - path.stat().st_mtime
    if age > HEARTBEAT_STALE_S:
        return Check("heartbeat", False, f"{path} is {age:.0f} s old: the bot is not answering",
                     "see its log; restart it")
    return Check("heartbeat", True, f"the bot answered {age:.0f} s ago")


def check_output_dir(config: Config) -> Check:
    path = Path(config.engine.output_dir)
    parent = path if path.exists() else _existing_parent(path)
    if os.access(parent, os.W_OK):
        files = [f for f in path.rglob("*.png") if f.is_file()] if path.exists() else []
        keep = config.engine.keep_outputs_days
        kept = f"kept {keep:g} days" if keep > 0 else "kept forever"
        return Check("output folder", True, f"{path} ({len(files)} images, "
                     f"{_size(sum(f.stat().st_size for f in files))}, {kept})")
    return Check("output folder", False, f"{path} is not writable",
                 f"make {parent} writable or set engine.output_dir")


def check_gpu(config: Config, gpu=None) -> Check:  # type: ignore[no-untyped-def]
    from engine.flux.gpu_probe import probe_gpu

    if config.model.device == "cpu":  # the same opinion as `run`: allowed, and slow
        return Check("GPU", True, 'model.device = "cpu": no GPU is used; an image takes many '
                                  "minutes")
    gpu = gpu if gpu is not None else probe_gpu(config.model.device)
    if not gpu.available:
        return Check("GPU", False, f"none usable: {gpu.problem} (torch {gpu.torch_version})",
                     "install the NVIDIA driver and a CUDA build of PyTorch, or set "
                     'engine.backend = "dry-run" to try the bot without a GPU')
    detail = f"{gpu.name}, {gpu.free_gib:.1f} of {gpu.total_gib:.1f} GiB free"
    from engine.flux.presets import STREAM_MIN_GIB

    least = STREAM_MIN_GIB + 1  # the block streamer's least, plus the CUDA context
    if gpu.free_gib < least:
        return Check("GPU", False, f"{detail}; at least {least:.0f} GiB free is needed",
                     "close other programs using the GPU")
    return Check("GPU", True, detail)


def check_plan(config: Config, gpu=None, host_available_gib: float | None = None  # type: ignore[no-untyped-def]
               ) -> list[Check]:
    """The memory plan the bot would make on this card, and whether the host has the memory
    it needs (the streamed blocks and T5 live in page-locked host memory)."""
    from engine.flux.gpu_probe import probe_gpu
    from engine.flux.plan_report import plan_report
    from engine.flux.presets import planned_config

    gpu = gpu if gpu is not None else probe_gpu(config.model.device)
    if not gpu.available:
        return []
    model = planned_config(config.model, gpu.float8_problem)  # as the backend plans
    report = plan_report(model, config.limits.max_pixels, gpu.name, gpu.free_gib,
                         gpu.total_gib - gpu.free_gib, config.limits.images_max)
    lines = report.lines()
    checks = [Check("memory plan", not report.problem, lines[0],
                    "free GPU memory or lower limits.max_pixels")]
    checks += [Check("memory plan", not report.problem, line) for line in lines[1:]]
    if config.model.float8_compute is not False:
        checks.append(Check("float8 compute", True, float8_line(config.model, model, report.plan,
                                                                gpu.float8_problem)))
    available = host_available_gib if host_available_gib is not None else _host_available_gib()
    if available is not None and available < report.host_needed_gib:
        checks.append(Check("host memory", False,
                            f"{available:.1f} GiB available, the plan needs about "
                            f"{report.host_needed_gib:.1f} GiB",
                            "close other programs, add swap-free RAM, or use a card with more "
                            "memory (fewer blocks streamed from the host)"))
    return checks


def float8_line(asked: ModelSection, planned: ModelSection, plan: MemoryPlan,
                problem: str | None) -> str:
    """Whether the DiT's matmuls will run in float8 on this card, and if not, why."""
    from engine.flux.presets import float8_applies, float8_wanted

    if float8_applies(plan, planned):
        return "on: the DiT's large matrix products run in float8"
    if not float8_wanted(asked):
        why = 'float8_compute = "auto" needs compiled blocks (model.compile) on a CUDA GPU'
    elif problem is not None:
        why = problem
    else:
        why = f"float8 matmuls do not apply to this plan (preset {plan.preset})"
    return f"off: {why}; the DiT computes in bf16"


def _host_available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def check_models(config: Config) -> list[Check]:
    from engine.flux.model_files import describe_model_files

    checks = []
    models_dir = Path(config.model.models_dir)
    if not models_dir.exists():
        fix = ("turn model.offline off to download them, or copy the files there"
               if config.model.offline else "")
        checks.append(Check("models folder", not config.model.offline,
                            f"{models_dir} does not exist yet"
                            + ("" if config.model.offline else ": `run` downloads the models"
                               " into it on first start (about 33 GB)"), fix))
    for entry in describe_model_files(config.model):
        size = f", {entry.size_bytes / 1e9:.1f} GB" if entry.size_bytes else ""
        if entry.present:
            checks.append(Check(entry.name, True, f"{entry.path}{size}"))
        elif entry.will_download:
            checks.append(Check(entry.name, True, f"missing, will be downloaded to {entry.path}"))
        else:
            checks.append(Check(entry.name, False, f"missing: {entry.path}",
                                "copy the file there, set its *_path, or set "
                                "model.offline = false"))
    return checks


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GB"


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent
