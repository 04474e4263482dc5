"""
What a run and a job tell the people who watch them:

- logging with levels: the console (INFO; --verbose DEBUG; --quiet WARNING and no progress bars) and train.log in the
  run's folder (every start on that folder, appended), for the duration of one train.py run (logging_for_run);
- the per-step record output_dir/steps.jsonl (one JSON line per log interval; --resume drops the lines after the
  resumed checkpoint's step, so the file never has a gap or a duplicate) and accelerate's experiment trackers
  (--log_with tensorboard, wandb, ...: the same figures, and the run's arguments as hyperparameters): TrainingLog;
- the start-of-run and end-of-run summaries of train.py (start_summary, end_summary), and those of a job of
  train_all_heads.sh (what it will run, where, and an estimate of its cost from a recorded measurement; at the end,
  where each head is, its figures, and how to load and evaluate it):

    python -m heinsen_replication.reporting start PROFILE [recipes' options: --data_root, --out, --seed, ...]
    python -m heinsen_replication.reporting end PROFILE [the same options]

Job summaries go to stderr, so that stdout stays what `LAUNCH=echo bash train_all_heads.sh` prints: the runs.
"""
import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import time

from . import recipes

LOGGER_NAME = 'heinsen_replication'                       # train.py logs as heinsen_replication.train
LOG_FILE, STEPS_FILE = 'train.log', 'steps.jsonl'
TRACKERS_DIR, TRACKERS_PROJECT = 'trackers', 'heinsen_routing'   # TensorBoard: output_dir/trackers/heinsen_routing/
LEVELS = {'quiet': logging.WARNING, 'normal': logging.INFO, 'verbose': logging.DEBUG}
log = logging.getLogger(__name__)

# -------------------------------------------------------------------------------------------------
# Logging for the duration of one run (train.py is the program: it configures; no module of ours does)
# -------------------------------------------------------------------------------------------------


class TqdmHandler(logging.StreamHandler):
    """A console handler that writes above tqdm's progress bars instead of through them."""

    def emit(self, record):
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def logging_for_run(verbosity='normal', is_main_process=True):
    """Our loggers (heinsen_replication.*) print to stdout at the verbosity's level while the block runs (the
    other processes of a multi-process run: warnings only); transformers' weight-loading bar is off unless
    --verbose. Everything is put back as it was afterwards: a program that calls train.main keeps its own set-up."""
    import transformers
    logger = logging.getLogger(LOGGER_NAME)
    console = TqdmHandler(sys.stdout)
    console.setLevel(LEVELS[verbosity] if is_main_process else logging.WARNING)
    console.setFormatter(logging.Formatter('%(message)s'))
    saved = logger.level, logger.propagate, transformers.utils.logging.is_progress_bar_enabled()
    console.run_handler = True
    logger.addHandler(console)
    logger.setLevel(min(LEVELS[verbosity], logging.INFO))    # the log file has INFO even with --quiet
    logger.propagate = False
    if verbosity != 'verbose':
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        for handler in list(logger.handlers):
            if getattr(handler, 'run_handler', False):
                logger.removeHandler(handler)
                handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if saved[2]:
            transformers.utils.logging.enable_progress_bar()


def log_to_file(output_dir, command):
    """Appends our loggers' messages to output_dir/train.log (with times and levels) until logging_for_run ends;
    a line first says who started what (command: the command line). Outside logging_for_run (a run built by a
    benchmark, say), nothing: no handler would be removed at the end. Only the main process writes it."""
    logger = logging.getLogger(LOGGER_NAME)
    if os.environ.get('RANK', '0') != '0' or not any(getattr(h, 'run_handler', False) for h in logger.handlers):
        return                                            # (the other processes of `accelerate launch`: no file)
    handler = logging.FileHandler(os.path.join(output_dir, LOG_FILE), encoding='utf-8')
    handler.run_handler = True
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    handler.setLevel(logger.level)
    logger.addHandler(handler)
    handler.emit(logging.LogRecord(LOGGER_NAME, logging.INFO, __file__, 0, f"started (pid {os.getpid()}): {command}",
                                   None, None))


# -------------------------------------------------------------------------------------------------
# The per-step record and the trackers
# -------------------------------------------------------------------------------------------------


def read_steps(path):
    """output_dir/steps.jsonl (the file or its folder) -> its records, in order. A last line cut short by a
    killed run is skipped (its step is after the last checkpoint, so --resume drops it anyway)."""
    path = os.path.join(path, STEPS_FILE) if os.path.isdir(path) else path
    records = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_scalars(output_dir):
    """{tag: [(step, value)], in step order} of the TensorBoard event files a run wrote (output_dir/trackers/), read
    by TensorBoard's own reader, which hides what a resumed run purged (the steps after its checkpoint)."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    multiplexer = EventMultiplexer().AddRunsFromDirectory(os.path.join(output_dir, TRACKERS_DIR))
    multiplexer.Reload()
    found = {}
    for name in multiplexer.Runs():
        for tag in multiplexer.GetAccumulator(name).Tags()['scalars']:
            found.setdefault(tag, []).extend((e.step, e.value) for e in multiplexer.Scalars(name, tag))
    return {tag: sorted(points) for tag, points in found.items()}


def add_reporting_options(p):
    """train.py's options for watching a run."""
    p.add_argument('--log_with', default=None,
                   help="experiment trackers (accelerate's), comma-separated: tensorboard (event files in "
                        "output_dir/trackers/), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio "
                        "where installed, or all installed ones. Every run also writes output_dir/steps.jsonl")
    p.add_argument('--log_every', type=int, default=50, help='optimizer steps per log interval (steps.jsonl, trackers)')
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument('--quiet', action='store_true', help='warnings and errors only, no progress bars')
    verbosity.add_argument('--verbose', action='store_true', help="debug messages too (every interval's record)")


def check_reporting_options(p, args, argv):
    """One-line errors (p.error) for those options; sets args.verbosity and args.command (the command line, for
    train.log)."""
    if args.log_every < 1:
        p.error(f"--log_every must be a positive integer, got {args.log_every}")
    missing = args.log_with and sorted(set(args.log_with.split(',')) - {'all', *trackers_available()})
    if missing:
        p.error(f"--log_with {','.join(missing)}: not an installed tracker; installed: "
                f"{', '.join(trackers_available()) or 'none'} (pip install tensorboard, or the tracker's package)")
    args.verbosity = 'quiet' if args.quiet else 'verbose' if args.verbose else 'normal'
    args.command = shlex.join(['train.py', *map(str, sys.argv[1:] if argv is None else argv)])


def trackers_available():
    """The names of accelerate's experiment trackers whose packages are installed here."""
    from accelerate.tracking import get_available_trackers
    return sorted(t.value for t in get_available_trackers())


def tracker_config(args, metadata):
    """The run's arguments and metadata as trackers take hyperparameters: bool, int, float or str values."""
    config = {**vars(args), **metadata}
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in sorted(config.items())}


class TrainingLog:
    """What a training run records while it goes, on the main process: every log interval, the interval's mean
    training loss and accuracy (against the mixed targets' argmax), the learning rate, the mean seconds per
    optimizer step and the samples per second (all processes), as a line of output_dir/steps.jsonl and to the
    trackers (train/...); every epoch, its evaluation (valid/accuracy or test/accuracy) and the epoch's means.
    Steps are optimizer steps from the start of the run (1 = after the first step). start_step: the steps a
    resumed checkpoint has done; the lines after it are dropped, and the trackers hide what they logged after it
    (TensorBoard's purge_step)."""

    def __init__(self, accelerator, output_dir, start_step, config):
        from .data import write_atomic
        self.accelerator, self.file = accelerator, None
        self.path = os.path.join(output_dir, STEPS_FILE)
        if accelerator.is_main_process:
            kept = [r for r in read_steps(self.path) if r.get('step', 0) <= start_step] \
                if os.path.exists(self.path) else []
            write_atomic(self.path, ''.join(json.dumps(r) + '\n' for r in kept).encode())
            self.file = open(self.path, 'a', encoding='utf-8')
        if accelerator.log_with:
            accelerator.init_trackers(TRACKERS_PROJECT, config=config,
                                      init_kwargs={'tensorboard': {'purge_step': start_step + 1}})

    def start_epoch(self, steps_done):
        """An epoch starts after steps_done optimizer steps; -> its start time, from which its first interval counts."""
        self.last = {'step': steps_done, 'loss': 0.0, 'correct': 0, 'seen': 0, 'time': time.time()}
        return self.last['time']

    def interval(self, step, epoch, loss_sum, n_correct, n_seen, lr):
        """The log interval that ends at optimizer step `step`, from the epoch's running sums on this process (the
        summed loss, the correct predictions, the samples seen) -> its record."""
        last, now = self.last, time.time()
        n_steps, n = step - last['step'], n_seen - last['seen']
        record = {'step': step, 'epoch': epoch, 'train_loss': (loss_sum - last['loss']) / n,
                  'train_acc': (n_correct - last['correct']) / n, 'lr': lr,
                  'step_seconds': (now - last['time']) / n_steps,
                  'samples_per_second': n * self.accelerator.num_processes / (now - last['time']), 'time': now}
        self.last = {'step': step, 'loss': loss_sum, 'correct': n_correct, 'seen': n_seen, 'time': now}
        if self.file is not None:
            self.file.write(json.dumps(record) + '\n')
            self.file.flush()
        self.accelerator.log({f'train/{k}': record[k] for k in ('train_loss', 'train_acc', 'lr', 'step_seconds',
                                                                 'samples_per_second')}, step=step)
        log.debug(json.dumps(record))
        return record

    def epoch(self, step, record):
        """An epoch's metrics record (metrics.jsonl's), at the step that ended it."""
        split = record['eval_split']
        self.accelerator.log({f'{split}/accuracy': record[f'{split}_acc'], 'epoch/train_loss': record['train_loss'],
                              'epoch/train_acc': record['train_acc'], 'epoch/seconds': record['epoch_seconds']},
                             step=step)

    def final(self, step, final):
        if 'test_accuracy' in final:
            self.accelerator.log({'test/accuracy': final['test_accuracy']}, step=step)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.accelerator.log_with:
            self.accelerator.end_training()


# -------------------------------------------------------------------------------------------------
# A run's start and end summaries
# -------------------------------------------------------------------------------------------------


def minutes(seconds):
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def start_summary(args, metadata, splits, steps_per_epoch, start_step, trackers):
    """What the run will do, in a few lines: model, data, backbone, device and precisions, steps, where it writes."""
    sizes = ', '.join(f"{k} {len(splits[k])}" for k in ('train', 'valid', 'test') if splits.get(k) is not None)
    total = args.n_epochs * steps_per_epoch
    resumed = f", resuming after step {start_step}" if start_step else ''
    lines = [f"train.py: {args.model} on {args.dataset_name} ({sizes} examples, {splits['n_classes']} classes)",
             f"  backbone:  {metadata.get('backbone') or args.backbone or 'none (trained end to end)'}"
             + (f" at revision {args.revision}" if args.revision else '')
             + (f", features from the cache {args.feature_cache}" if args.feature_cache else ''),
             f"  device:    {metadata['device']}; backbone {metadata['backbone_precision']}, head "
             f"{metadata['head_precision']}, matmul precision {metadata['matmul_precision']}",
             f"  steps:     {args.n_epochs} epoch(s) x {steps_per_epoch} steps of {args.batch_sz} = {total} optimizer "
             f"steps{resumed}" + (f"; from {args.pretrained_path} ({args.finetune})" if args.pretrained_path else ''),
             f"  output:    {args.output_dir}/ (checkpoint.pt, metrics.jsonl, {STEPS_FILE}, {LOG_FILE}, model/)"
             + (f"; {', '.join(str(getattr(t, 'value', t)) for t in trackers)} in "
               f"{os.path.join(args.output_dir, TRACKERS_DIR)}/" if trackers else '')]
    return '\n'.join(lines)


def how_to_use(model_dir, training):
    """-> (the Python that loads the model, the train.py command that evaluates it on the test split)."""
    load = f"import models; head, config = models.from_pretrained({model_dir!r})"
    evaluate = ['python', 'train.py', '--dataset_name', training.get('dataset_name'), '--eval_only',
                '--pretrained_path', model_dir]
    for option in ('data_root', 'feature_cache', 'mixed_precision'):
        if training.get(option) not in (None, '.data'):
            evaluate += [f'--{option}', str(training[option])]
    return load, shlex.join(evaluate)


def figures(final, history):
    """A final metrics record (and the epochs' records) -> 'valid accuracy 45.41%, test accuracy 43.35%, ...'."""
    parts = [f"{split} accuracy {final[f'{split}_accuracy']:.2%}" for split in ('valid', 'test')
             if final.get(f'{split}_accuracy') is not None]
    if history:
        parts.append(f"last epoch's training loss {history[-1]['train_loss']:.4f}")
        parts.append(f"{len(history)} epoch(s) in {minutes(sum(r.get('epoch_seconds', 0) for r in history))}")
    return ', '.join(parts)


def end_summary(model_dir, final, history, training):
    """Where the head is, its figures, how to load and evaluate it (from the repository root)."""
    load, evaluate = how_to_use(model_dir, training)
    return '\n'.join([f"done: {final.get('model')} for {final.get('dataset_name')} in {model_dir}/",
                      f"  figures:   {figures(final, history)}",
                      f"  load:      python -c \"{load}\"",
                      f"  evaluate:  {evaluate}"])


# -------------------------------------------------------------------------------------------------
# A job of train_all_heads.sh: its start summary (with an estimate of its cost) and its end summary
# -------------------------------------------------------------------------------------------------

RECORD = os.path.join('docs', 'resources', 'record.json')   # python -m benchmarks.resources --run adds to it


def options(argv):
    """A train.py argument list -> {option: value, or True for a flag}."""
    found = {}
    for k, word in enumerate(argv):
        if word.startswith('--'):
            nxt = argv[k + 1] if k + 1 < len(argv) else None
            found[word[2:]] = True if nxt is None or nxt.startswith('--') else nxt
    return found


def cpu_model():
    return recipes.cpuinfo('model name') or 'an unknown CPU'


def measured_offline(record_path):
    """The headline measurement of the offline job in the record (benchmarks.resources --run): the latest made
    while no other work shared the machine (its meta says 'busy', or its load average passed the cores), or None."""
    if not os.path.isfile(record_path):
        return None
    with open(record_path, encoding='utf-8') as f:
        measured = json.load(f).get('offline', [])

    def busy(meta):
        loads = [v for v in (meta.get('load_start'), meta.get('load_end')) if isinstance(v, (int, float))]
        return meta.get('busy', bool(loads) and max(loads) >= (meta.get('cpu_count') or 0) + 1)
    idle = [m for m in measured if not busy(m['meta'])]
    return idle[-1] if idle else None


def estimate(profile, runs, record_path):
    """-> a line estimating the offline job's wall time from its measurement (measured_offline), or None for other
    profiles. Where the measurement has each run's steps and seconds, only what is left is counted (a run whose
    model/ exists is skipped; the feature cache is not built again where its folder exists); otherwise the whole
    job's time from scratch."""
    measured = measured_offline(record_path) if profile == 'offline' else None
    if measured is None:
        return None
    left = [name for name, argv in runs.items() if not os.path.isdir(os.path.join(options(argv)['output_dir'], 'model'))]
    cache = options(next(iter(runs.values()))).get('feature_cache')
    seconds, parts = measured['wall_s'], []
    if measured.get('runs'):                              # per run: steps x its measured seconds per step
        seconds = 0.0 if cache and os.path.isdir(os.path.join(cache, 'minilm')) else \
            measured['wall_s'] - sum(r['seconds'] for r in measured['runs'].values())
        parts.append(f"loading and encoding ~{minutes(seconds)}")
        for name in left:
            rate = measured['runs'][name]
            opts = options(runs[name])
            steps = int(opts.get('n_epochs', 1)) * int(opts.get('n_iters_per_train_epoch', rate['steps']))
            seconds += steps * rate['seconds'] / rate['steps']
            parts.append(f"{name} {steps} steps ~{minutes(steps * rate['seconds'] / rate['steps'])}")
    elif len(left) < len(runs):
        parts.append(f"less: {', '.join(sorted(set(runs) - set(left)))} finished")
    meta = measured['meta']
    if not left:
        return "  estimate:  nothing left to train (every run has its model/)"
    return (f"  estimate:  about {minutes(seconds)} of wall clock" + (f" ({'; '.join(parts)})" if parts else '')
            + f", from `{meta.get('command')}`: {minutes(measured['wall_s'])} from scratch on {meta.get('cpu_count')} "
            f"cores of {meta.get('cpu_model') or 'a CPU not recorded'} ({meta.get('when')}); this machine: "
            f"{os.cpu_count()} cores of {cpu_model()}")


def job_start(profile, runs, out, record_path=RECORD):
    first = options(next(iter(runs.values())))
    lines = [f"train_all_heads.sh {profile}: {len(runs)} run(s), seed {first.get('rng_seed', 0)}, into "
             f"{os.path.join(out, profile)}/ (a run that stopped resumes; a finished one is skipped)"]
    for name, argv in runs.items():
        opts = options(argv)
        steps = (f"{opts.get('n_epochs', 3)} epoch(s) of " + (f"{opts['n_iters_per_train_epoch']} steps"
                 if 'n_iters_per_train_epoch' in opts else 'one pass') + f", batch {opts.get('batch_sz', 'default')}")
        backbone = opts.get('mixed_precision') or ('float32' if opts.get('device') == 'cpu' else
                                                    "train.py's default (fp16 on a GPU, float32 on a CPU)")
        precision = f"backbone {backbone}, head float32, matmul {opts.get('matmul_precision', 'highest')}"
        lines.append(f"  {name + ':':<10} {opts.get('model', 'routing_head')} for {opts['dataset_name']} on "
                     f"{opts.get('backbone', 'minilm')}, {steps}; device {opts.get('device', 'auto')}, {precision}"
                     + (f"; from {opts['pretrained_path']}" if 'pretrained_path' in opts else ''))
    lines.append(f"  data:      {first['data_root']}/" + (f", feature cache {first['feature_cache']}/"
                                                          if 'feature_cache' in first else ''))
    lines.append(estimate(profile, runs, record_path) or
                 f"  estimate:  no measurement recorded for the {profile} profile (only for: offline)")
    return '\n'.join(lines)


def job_end(profile, runs):
    from .runs import read_metrics
    lines, model_dir = [f"train_all_heads.sh {profile}: done"], None
    for name, argv in runs.items():
        out = options(argv)['output_dir']
        if not os.path.isfile(os.path.join(out, 'model', 'config.json')):
            lines.append(f"  {name + ':':<10} no model in {out}/model/: the run has not finished; run the job again "
                         f"to resume it")
            continue
        model_dir = os.path.join(out, 'model')
        history, final = read_metrics(out)
        with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
            training = {**options(argv), **json.load(f).get('training', {})}
        lines.append(f"  {name + ':':<10} {model_dir}/: {figures(final or {}, history)}")
        lines.append(f"  {'':<10} evaluate: {how_to_use(model_dir, training)[1]}")
    if model_dir:
        lines.append(f"  load:      python -c \"{how_to_use(model_dir, {})[0]}\" (from the repository root; "
                     f"docs/pretrained.md)")
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('when', choices=['start', 'end'])
    recipes.add_profile_options(p)
    p.add_argument('--record', default=RECORD, help='the measured record the estimate is made from')
    args = p.parse_args(argv)
    runs = recipes.profile_runs(args)
    print(job_start(args.profile, runs, args.out, args.record) if args.when == 'start' else job_end(args.profile, runs),
          file=sys.stderr)


if __name__ == '__main__':
    main()
