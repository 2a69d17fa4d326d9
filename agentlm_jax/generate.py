"""Generate text: `python -m agentlm_jax.generate --model DIR --prompt TEXT [--prompt TEXT ...] [options]`.

    python -m agentlm_jax.generate --model runs/tiny/hf --prompt "Hello" --max-new-tokens 32 --greedy
    python -m agentlm_jax.generate --model runs/tiny/checkpoints --tokenizer TOK --chat --prompt "ls /tmp?"

`--model` is a Hugging Face directory or a training run's orbax checkpoint directory (`--step`, default the
latest). The prompts decode as one batch with a KV cache (agentlm_jax.inference.generate).

Exit status: 0 when generated; 1 with one `error: ...` line when the model or the tokenizer is missing or
unusable; 2 (with the usage line) for bad command-line syntax or an invalid option value.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from typing import Sequence

from agentlm_jax import cli, distributed
from agentlm_jax.config import SamplingConfig
from agentlm_jax.errors import MissingInputError
from agentlm_jax.hf.config import CHAT_GENERATION_DEFAULTS
from agentlm_jax.inference.generate import Generator
from agentlm_jax.model_source import check_source, check_tokenizer, default_tokenizer, load_model, step_arg

log = logging.getLogger("agentlm_jax.generate")


def _number_arg(convert, ok, requirement: str):
    """An argparse type: `convert(text)`, refused with `requirement` unless `ok(value)`."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = convert.__name__  # what argparse's own messages call the type
    return parse


positive_int = _number_arg(int, lambda v: v >= 1, ">= 1")
non_negative_int = _number_arg(int, lambda v: v >= 0, ">= 0")
positive_float = _number_arg(float, lambda v: 0 < v < math.inf, "> 0 (for always the most likely token, use --greedy)")
probability = _number_arg(float, lambda v: 0 < v <= 1, "in (0, 1]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agentlm_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face directory or a training run's orbax checkpoint "
                   "directory (local or gs://)")
    p.add_argument("--step", type=step_arg, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: a Hugging Face --model's own "
                   "tokenizer files; for an orbax checkpoint, the tokenizer the training run recorded)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template the model was trained "
                   "with (its tokenizer's chat_template.jinja; without one, the Llama-2-chat template)")
    p.add_argument("--system-prompt", default=None, help="system prompt for --chat (default: the training one; "
                   "\"\" for none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="tokens to generate at most per prompt (default %(default)s)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (default: sample)")
    p.add_argument("--temperature", type=positive_float, default=CHAT_GENERATION_DEFAULTS["temperature"],
                   help="sampling temperature, > 0 (default %(default)s, Llama-2-chat's)")
    p.add_argument("--top-p", type=probability, default=CHAT_GENERATION_DEFAULTS["top_p"],
                   help="nucleus sampling: keep the most likely tokens up to this probability, in (0, 1]; 1 = off "
                   "(default %(default)s)")
    p.add_argument("--top-k", type=non_negative_int, default=SamplingConfig.top_k,
                   help="keep the k most likely tokens; 0 = off (default %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype the parameters are loaded and computed in (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (prompt, completion, "
                   "prompt_tokens, tokens, stopped)")
    cli.add_mesh_args(p, fsdp=1)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.system_prompt is not None and not args.chat:
        p.error("--system-prompt applies to --chat prompts only")
    return args


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool, system_prompt: str | None,
                   tokenizer_dir: str | None = None) -> list[list[int]]:
    """Prompt ids: plain text after BOS, or (`chat`) the user message in the chat template the data was built
    with (the tokenizer directory's chat_template.jinja: a Jinja template through apply_chat_template with the
    generation prompt; without one, the paper's Llama 2 template). `system_prompt` None: the training default
    (Llama 2's prompt; none for a Jinja template, whose own default then applies)."""
    if not chat:  # `<s>` first, as every training block began (the pipeline's tokenizer adds no BOS itself)
        return [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    from agentlm_jax.hf.tokenizer import training_chat_template
    from data_pipeline.formats.chat_template import DEFAULT_SYSTEM_PROMPT, encode_generation_prompt

    template, is_llama2 = training_chat_template(tokenizer_dir) if tokenizer_dir else (None, True)
    if not is_llama2:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return [list(tokenizer.apply_chat_template(system + [{"role": "user", "content": p}], chat_template=template,
                                                   add_generation_prompt=True, tokenize=True, return_dict=False))
                for p in prompts]
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    return [encode_generation_prompt([{"role": "user", "content": p}], tokenizer, system_prompt=system)
            for p in prompts]


def check_args(args: argparse.Namespace) -> None:
    """What is cheap to check from the file listings, before the hosts join up (nothing here touches JAX)."""
    check_source(args.model, step=args.step, flag="--model")
    if args.tokenizer:
        check_tokenizer(args.tokenizer)


def tokenizer_of(args: argparse.Namespace) -> str:
    """--tokenizer, or the model's own (for a checkpoint, read from the run's info with orbax), checked."""
    if args.tokenizer:
        return args.tokenizer
    tokenizer = default_tokenizer(args.model, step=args.step)
    if tokenizer is None:
        raise MissingInputError(f"--model {args.model} has no tokenizer files and records no tokenizer; "
                                f"pass --tokenizer DIR")
    check_tokenizer(tokenizer, what=f"the tokenizer of --model {args.model},")
    return tokenizer


def generate(args: argparse.Namespace) -> list[dict]:
    check_args(args)
    distributed.initialize(args.distributed)
    mesh = cli.cli_mesh(args)
    cli.require_all_devices(mesh)
    tokenizer_dir = tokenizer_of(args)
    from data_pipeline.formats.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    cfg, model = load_model(args.model, step=args.step, dtype=args.dtype, mesh=mesh,
                            show_progress=distributed.is_main_process())
    prompts = encode_prompts(tokenizer, args.prompt, chat=args.chat, system_prompt=args.system_prompt,
                             tokenizer_dir=tokenizer_dir)
    sampling = (SamplingConfig(greedy=True) if args.greedy else
                SamplingConfig(greedy=False, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k))
    stop_ids = sorted({*cfg.stop_token_ids, tokenizer.eos_token_id} - {None})
    generator = Generator(model, stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    result = generator(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    seconds = time.perf_counter() - start
    outputs = []
    for prompt, prompt_ids, ids, finished in zip(args.prompt, prompts, result.tokens, result.finished):
        record = {"prompt": prompt, "completion": tokenizer.decode(ids, skip_special_tokens=True),
                  "prompt_tokens": list(prompt_ids), "tokens": ids, "stopped": finished}
        outputs.append(record)
        if distributed.is_main_process():
            print(json.dumps(record, ensure_ascii=False) if args.json else f"### {prompt}\n{record['completion']}\n")
    log.info("%d prompts, %d steps, %.1f s (compile included)", len(prompts), result.steps, seconds)
    return outputs


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """On a pod slice, run it on every worker (tpu/run.sh --foreground ...): the hosts join up, the model is
    sharded over all devices (--fsdp -1), every host decodes the same prompts, process 0 prints."""
    cli.configure_logging()
    args = parse_args(argv)
    return cli.run_reporting_errors(lambda: generate(args))


if __name__ == "__main__":
    main()
