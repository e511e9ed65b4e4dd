import json
import os

import click
import numpy as np
import pytest
import torch

import dnnlib
import train_edm2
from helpers import (assert_same_state, latent_files, load_pickle, load_state, read_stats, run_script, torchrun,
    write_dataset, write_image_zip)

# data16 and teacher16 are conftest.py's.


def parse_args(args):
    """Option values exactly as click hands them to the command."""
    ctx = train_edm2.cmdline.make_context('train_edm2.py', list(args))
    return {key: value for key, value in ctx.params.items() if key not in ('outdir', 'dry_run')}


def config_for(*args):
    return train_edm2.setup_training_config(**parse_args(['--outdir=unused', *args]))


#----------------------------------------------------------------------------
# Option parsing and configuration (in-process, fast).

@pytest.mark.parametrize('text, expected', [('0', 0), ('2048', 2048), ('3Ki', 3 << 10), ('8Mi', 8 << 20), ('2Gi', 2 << 30)])
def test_image_count_parsing(text, expected, data16):
    assert parse_args([f'--data={data16}', '--outdir=x', f'--status={text}'])['status'] == expected


@pytest.mark.parametrize('text', ['8M', '1.5Ki', '-4', 'Ki', 'lots'])
def test_image_count_rejects(text, data16):
    with pytest.raises(click.BadParameter, match="is not an image count"):
        parse_args([f'--data={data16}', '--outdir=x', f'--duration={text}'])


def test_presets_cover_edm2_table():
    expected = dict(xxs=(2048, 64), xs=(2048, 128), s=(2048, 192), m=(2048, 256), l=(1792, 320), xl=(1280, 384), xxl=(896, 448))
    for size, (duration_Mi, channels) in expected.items():
        preset = dnnlib.EasyDict(train_edm2.PRESETS[f'edm2-img512-{size}'])
        assert (preset.duration, preset.channels, preset.batch, preset.decay) == (duration_Mi << 20, channels, 2048, 70000)
        assert (preset.P_mean, preset.P_std) == (-0.4, 1.0)
    img64 = dnnlib.EasyDict(train_edm2.PRESETS['edm2-img64-m'])
    assert (img64.duration, img64.channels, img64.lr, img64.dropout, img64.P_mean, img64.P_std, img64.decay) == \
        (2048 << 20, 256, 0.0090, 0.10, -0.8, 1.6, 35000)
    assert sorted(name for name in train_edm2.PRESETS if name.startswith('edm2-img64-')) == \
        ['edm2-img64-' + size for size in sorted(['xs', 's', 'm', 'l', 'xl'])]


def test_tiny_preset_config(data16):
    c = config_for(f'--data={data16}', '--cond=False', '--preset=tiny-img16', '--lr=0.02', '--batch-gpu=16')
    assert list(c.keys()) == ['dataset_kwargs', 'encoder_kwargs', 'total_nimg', 'batch_size', 'network_kwargs', 'loss_kwargs',
        'lr_kwargs', 'batch_gpu', 'loss_scaling', 'cudnn_benchmark', 'status_nimg', 'snapshot_nimg', 'checkpoint_nimg', 'seed']
    assert c.dataset_kwargs == dict(class_name='training.dataset.ImageFolderDataset', path=data16, use_labels=False)
    assert c.encoder_kwargs.class_name == 'training.encoders.StandardRGBEncoder'
    assert c.network_kwargs.model_channels == 32 and c.network_kwargs.channel_mult == [1, 2]
    assert c.lr_kwargs.ref_lr == 0.02 and c.batch_gpu == 16
    assert c.snapshot_nimg % 1024 == 0 and c.checkpoint_nimg % 1024 == 0 and c.snapshot_nimg % c.batch_size == 0

    from training.networks_edm2 import Precond
    net = Precond(img_resolution=16, img_channels=3, label_dim=0,
        **{key: value for key, value in c.network_kwargs.items() if key != 'class_name'})
    assert 1e5 < sum(p.numel() for p in net.parameters()) < 2e6


def test_edm2_preset_defaults_intervals(tmp_path):
    latents = write_dataset(tmp_path / 'latents', latent_files([np.zeros([8, 64, 64], dtype=np.float32)] * 2))
    c = config_for(f'--data={latents}', '--cond=False', '--preset=edm2-img512-xs')
    assert c.encoder_kwargs.class_name == 'training.encoders.StabilityVAEEncoder'
    assert (c.total_nimg, c.batch_size, c.network_kwargs.model_channels, c.lr_kwargs.ref_lr) == (2048 << 20, 2048, 128, 0.0120)
    assert (c.status_nimg, c.snapshot_nimg, c.checkpoint_nimg, c.batch_gpu) == (128 << 10, 8 << 20, 128 << 20, None)


@pytest.mark.parametrize('args, option, message', [
    (['--data={missing}'], '--data', 'does not exist'),
    (['--data={not_dataset}'], '--data', 'must be a directory or a .zip file'),
    (['--data={data12}', '--preset=edm2-img64-s'], '--data', "holds 12x12 images, which preset 'edm2-img64-s' cannot"),
    (['--data={data16}', '--cond=True'], '--cond', 'has no labels'),
    (['--data={data16}', '--preset=tiny-img99'], '--preset', "unknown preset 'tiny-img99'"),
    (['--data={data16}', '--snapshot=1000'], '--snapshot', 'not a multiple of both 1024 and the batch size'),
    (['--data={data16}', '--duration=1000'], '--duration', 'not a multiple of the batch size (32)'),
    (['--data={data16}', '--batch-gpu=24'], '--batch-gpu', 'not a multiple of 24 images per forward pass'),
    (['--data={data16}', '--batch=0'], '--batch', 'below the smallest allowed count'),
    (['--data={data16}', '--duration=0'], '--duration', 'below the smallest allowed count'),
    (['--data={data16}', '--lr=nan'], '--lr', 'not a finite number'),
    (['--data={data16}', '--P_mean=inf'], '--P_mean', 'not a finite number'),
    (['--data={data16}', '--P_std=-1'], '--P_std', 'P_std must be positive'),
])
def test_config_errors_name_the_option(args, option, message, data16, tmp_path):
    not_dataset = tmp_path / 'notes.txt'
    not_dataset.write_text('hello')
    data12 = write_image_zip(tmp_path / 'digits12.zip', 4, 12)
    paths = dict(missing=tmp_path / 'nope.zip', not_dataset=not_dataset, data16=data16, data12=data12)
    args = [arg.format(**paths) for arg in args]
    defaults = ['--cond=False', '--preset=tiny-img16']
    with pytest.raises(click.BadParameter) as info:
        config_for(*defaults, *args)
    text = info.value.format_message()
    assert option in text and message in text


#----------------------------------------------------------------------------
# The script itself, in subprocesses.

def test_dry_run(data16, tmp_path):
    outdir = tmp_path / 'run'
    result = run_script('train_edm2.py', f'--outdir={outdir}', f'--data={data16}', '--cond=False', '--preset=tiny-img16',
        '--duration=2Ki', '--dry-run')
    config_text = result.stdout.split('Training config:\n', 1)[1].split('\n\n', 1)[0]
    config = json.loads(config_text)
    assert config['total_nimg'] == 2048 and config['batch_size'] == 32
    assert config['dataset_kwargs']['path'] == data16
    assert str(outdir) in result.stdout
    assert not outdir.exists()


def test_cli_error_exit(tmp_path):
    result = run_script('train_edm2.py', f'--outdir={tmp_path / "run"}', f'--data={tmp_path / "missing.zip"}', check=False)
    assert result.returncode == 2
    assert 'Invalid value for --data' in result.stderr and 'does not exist' in result.stderr
    assert not (tmp_path / 'run').exists()


TRAIN_ARGS = ['--cond=False', '--preset=tiny-img16', '--channels=8', '--batch=32', '--status=512', '--snapshot=1Ki',
    '--checkpoint=1Ki', '--seed=3']


@pytest.fixture(scope='module')
def full_run(data16, tmp_path_factory):
    outdir = tmp_path_factory.mktemp('full') / 'run'
    run_script('train_edm2.py', f'--outdir={outdir}', f'--data={data16}', '--duration=2Ki', *TRAIN_ARGS)
    return outdir


@pytest.mark.slow
def test_run_dir_contents(full_run, data16):
    files = sorted(os.listdir(full_run))
    assert files == ['.lock', 'log.txt', 'network-snapshot-0000000-0.050.pkl', 'network-snapshot-0000000-0.100.pkl',
        'network-snapshot-0000001-0.050.pkl', 'network-snapshot-0000001-0.100.pkl',
        'network-snapshot-0000002-0.050.pkl', 'network-snapshot-0000002-0.100.pkl',
        'stats.jsonl', 'training-state-0000001.pt', 'training-state-0000002.pt', 'training_options.json']

    options = json.loads((full_run / 'training_options.json').read_text())
    assert options['total_nimg'] == 2048 and options['batch_size'] == 32 and options['seed'] == 3

    log = (full_run / 'log.txt').read_text()
    status_lines = [line for line in log.splitlines() if line.startswith('Status: ')]
    assert [line.split()[2] for line in status_lines] == ['0.0', '0.5', '1.0', '1.5', '2.0']
    assert all(' sec/kimg ' in line and ' cpumem ' in line for line in status_lines)

    stats = read_stats(full_run)
    assert [entry['Progress/kimg'] for entry in stats] == [0.0, 0.512, 1.024, 1.536, 2.048]
    assert list(stats[0]) == ['Progress/kimg', 'Timing/total_sec', 'Timing/sec_per_tick', 'Timing/sec_per_kimg',
        'Timing/maintenance_sec', 'Resources/cpu_mem_gb', 'Resources/peak_gpu_mem_gb',
        'Resources/peak_gpu_mem_reserved_gb', 'timestamp']
    assert list(stats[1])[8:] == ['Loss/loss', 'Loss/learning_rate', 'Loss/grad_norm', 'Loss/nan_inf_grad_count',
        'Loss/nonfinite_step', 'timestamp']
    assert all(entry['Loss/nonfinite_step'] == 0 for entry in stats[1:])
    assert all(np.isfinite(entry['Loss/loss']) for entry in stats[1:])
    assert stats[-1]['Loss/learning_rate'] > stats[1]['Loss/learning_rate'] > 0  # still warming up

    snapshot = load_pickle(full_run / 'network-snapshot-0000002-0.100.pkl')
    assert list(snapshot.keys()) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
    assert snapshot['dataset_kwargs'] == dict(class_name='training.dataset.ImageFolderDataset', path=data16, use_labels=False)
    assert type(snapshot['loss_fn']).__name__ == 'EDM2Loss' and snapshot['loss_fn'].P_mean == -0.8
    ema = snapshot['ema']
    assert not ema.training and all(t.dtype == torch.float16 for t in [*ema.parameters(), *ema.buffers()])
    assert not any(p.requires_grad for p in ema.parameters())

    state = load_state(full_run / 'training-state-0000002.pt')
    assert list(state.keys()) == ['state', 'net', 'loss_fn', 'optimizer', 'ema']
    assert state['state']['cur_nimg'] == 2048 and state['state']['total_elapsed_time'] > 0
    assert state['loss_fn']['P_std'] == 1.6
    assert all(entry['step'].item() == 64 for entry in state['optimizer']['state'].values())
    assert state['ema']['stds'] == [0.05, 0.1] and len(state['ema']['emas']) == 2
    assert all(value.dtype == torch.float32 for value in state['net'].values() if value.is_floating_point())


@pytest.mark.slow
def test_resume_continues_identically(full_run, data16, tmp_path):
    outdir = tmp_path / 'run'
    run_script('train_edm2.py', f'--outdir={outdir}', f'--data={data16}', '--duration=1Ki', *TRAIN_ARGS)
    assert sorted(name for name in os.listdir(outdir) if name.endswith('.pt')) == ['training-state-0000001.pt']
    second = run_script('train_edm2.py', f'--outdir={outdir}', f'--data={data16}', '--duration=2Ki', *TRAIN_ARGS)
    assert 'training-state-0000001.pt' in second.stdout

    resumed = load_state(outdir / 'training-state-0000002.pt')
    straight = load_state(full_run / 'training-state-0000002.pt')
    assert resumed['state']['cur_nimg'] == straight['state']['cur_nimg'] == 2048
    assert_same_state(straight, resumed, parts=('net', 'ema', 'optimizer'))

    # The resumed session adds no status at its starting point and repeats the loss sequence.
    stats_resumed, stats_straight = read_stats(outdir), read_stats(full_run)
    assert [entry['Progress/kimg'] for entry in stats_resumed] == [0.0, 0.512, 1.024, 1.536, 2.048]
    assert [entry['Loss/loss'] for entry in stats_resumed[1:]] == [entry['Loss/loss'] for entry in stats_straight[1:]]
    log = (outdir / 'log.txt').read_text()  # appended to, not overwritten
    assert log.count('Training from ') == 2
    assert [line.split()[2] for line in log.splitlines() if line.startswith('Status: ')] == ['0.0', '0.5', '1.0', '1.5', '2.0']


@pytest.mark.slow
def test_torchrun_two_processes(data16, tmp_path):
    outdir = tmp_path / 'run'
    run_script('train_edm2.py', f'--outdir={outdir}', f'--data={data16}', '--cond=False', '--preset=tiny-img16',
        '--channels=8', '--batch=32', '--batch-gpu=8', '--duration=256', '--status=128', '--snapshot=0', '--checkpoint=1Ki',
        launcher=torchrun())
    state = load_state(outdir / 'training-state-0000000.pt')
    assert state['state']['cur_nimg'] == 256
    assert all(entry['step'].item() == 8 for entry in state['optimizer']['state'].values())
    log = (outdir / 'log.txt').read_text()
    assert log.count('Status: ') == 3  # one writer: rank 0

#----------------------------------------------------------------------------
# EDM2 habits: a preset sets hyperparameters, the data sets the resolution, and no option is
# accepted where the chosen mode would not use it.

@pytest.mark.parametrize('resolution', [16, 32, 64])
def test_edm2_presets_take_the_resolution_from_the_data(resolution, tmp_path):
    data = write_image_zip(tmp_path / 'data.zip', 2, resolution)
    c = config_for(f'--data={data}', '--cond=False', '--preset=edm2-img64-s')
    assert c.network_kwargs.model_channels == 192 and 'img_resolution' not in c.network_kwargs


def test_unbuildable_resolution_names_what_would_work(tmp_path):
    data = write_image_zip(tmp_path / 'data20.zip', 2, 20)
    with pytest.raises(click.BadParameter) as info:
        config_for(f'--data={data}', '--cond=False', '--preset=edm2-img64-s')
    text = info.value.format_message()
    assert '20x20' in text and 'channel_mult [1, 2, 3, 4]' in text and 'multiple of 8' in text
    c = config_for(f'--data={data}', '--cond=False', '--preset=tiny-img16')  # two levels: 20 halves once
    assert c.network_kwargs.channel_mult == [1, 2]


@pytest.mark.parametrize('args, option, message', [
    (['--S=4'], '--S', 'is an option of --method=cd|ct, but this run trains with --method=edm2 (--teacher=PKL chooses'),
    (['--cd_lr=0.001', '--T_end=64'], '--T_end', 'is an option of --method=cd|ct'),
    (['--no_sync_dropout'], '--sync_dropout', 'is an option of --method=cd|ct'),
    (['--method=cd', '--duration=1Ki'], '--teacher', 'needs a teacher network pickle'),
    (['--dout_resolutions=64', '--dropout=0.1'], '--dout_resolutions', 'not resolutions of this network'),
    (['--dout_resolutions=8'], '--dout_resolutions', 'dropout is 0'),
    (['--dout_resolutions=8,x'], '--dout_resolutions', 'expected comma-separated resolutions'),
    (['--checkpoint_keep_recent=2', '--checkpoint=0'], '--checkpoint_keep_recent', 'writes no training states'),
])
def test_options_without_effect_in_plain_training_are_refused(args, option, message, data16):
    with pytest.raises(click.BadParameter) as info:
        config_for(f'--data={data16}', '--cond=False', '--preset=tiny-img16', *args)
    text = info.value.format_message()
    assert option in text and message in text


def test_method_option_errors_name_the_method_the_preset_chose(data16, teacher16):
    with pytest.raises(click.BadParameter) as info:
        config_for(f'--data={data16}', '--cond=False', '--preset=scd-tiny-img16', '--method=sct', '--duration=1Ki',
                   f'--teacher={teacher16}')
    text = info.value.format_message()
    assert 'is an option of --method=cd|scd, but this run trains with --method=sct' in text and 'chooses' not in text
    assert config_for(f'--data={data16}', '--cond=False', '--preset=scd-tiny-img16', f'--teacher={teacher16}') \
        .loss_kwargs.class_name == 'training.loss_scm.SCDLoss'  # the preset's method, though --teacher would mean cd


@pytest.mark.parametrize('args, option, message', [
    (['--channels=64'], '--channels', 'the architecture of its pretrained network'),
    (['--P_mean=-1'], '--P_mean', 'is an option of --method=edm2|cdm, but this run trains with --method=cd (--method=cd has --cd_P_mean)'),
    (['--dropout=0.1', '--cd_dropout=0.2'], '--dropout', 'give one of them'),
    (['--lr=0.01', '--cd_lr=0.02'], '--cd_lr', 'give one of them'),
    (['--cd_P_std=2'], '--cd_P_std', "P_std has no effect with sampling_mode='vp'"),
    (['--cd_loss=l2', '--cd_huber_c=0.01'], '--cd_huber_c', "pseudo_huber_c has no effect with loss_type='l2'"),
    (['--cd_huber_delta=0.01'], '--cd_huber_delta', "huber_delta has no effect with loss_type='pseudo_huber'"),
    (['--cd_huber_c=-1'], '--cd_huber_c', 'pseudo_huber_c must be >= 0'),
    (['--sampling_mode=uniform', '--terminal_anchor'], '--terminal_anchor', 'probability 1/S there'),
    (['--S=4', '--T_start=3'], '--T_start', 'cannot cover 4 student steps'),
    (['--student_sigma_min=80'], '--student_sigma_min', 'student_sigma_min < sigma_max = 80.0, got 80.0'),
    (['--sigma_min=0.7'], '--student_sigma_min', 'sigma_min = 0.7 <= student_sigma_min'),
    (['--S=1', '--student_sigma_min=0.5'], '--student_sigma_min', 'with --S=1 the student samples in one step'),
    (['--cond=True', '--data={labelled}'], '--teacher', 'label dimension: teacher 0, data 10'),
    (['--teacher={empty}'], '--teacher', 'is empty or truncated'),
    (['--teacher={missing}'], '--teacher', 'does not exist'),
])
def test_options_without_effect_in_distillation_are_refused(args, option, message, data16, teacher16, tmp_path):
    labelled = write_image_zip(tmp_path / 'labelled.zip', 10, 16, labels=range(10))
    (tmp_path / 'empty.pkl').write_bytes(b'')
    args = [arg.format(labelled=labelled, empty=tmp_path / 'empty.pkl', missing=tmp_path / 'missing.pkl') for arg in args]
    with pytest.raises(click.BadParameter) as info:
        config_for(f'--data={data16}', '--cond=False', '--preset=cd-tiny-img16', f'--teacher={teacher16}', *args)
    text = info.value.format_message()
    assert option in text and message in text


def test_student_settings_under_either_name(data16, teacher16):
    base = [f'--data={data16}', '--cond=False', f'--teacher={teacher16}']
    c = config_for(*base, '--preset=cd-tiny-img16')
    preset = train_edm2.PRESETS['cd-tiny-img16']
    assert (c.network_kwargs.dropout, c.lr_kwargs.ref_lr, c.lr_kwargs.ref_batches) == (0.0, preset['lr'], preset['decay'])
    assert c.loss_kwargs.teacher_solver == preset['teacher_solver'] == 'ddim'  # the recipe study's choices
    assert c.loss_kwargs.student_sigma_min == preset['student_sigma_min'] == 0.6
    assert config_for(*base, '--preset=cd-tiny-img16', '--student_sigma_min=0.002').loss_kwargs.student_sigma_min == 0.002
    assert config_for(*base, '--preset=cd-tiny-img16', '--S=1').loss_kwargs.S == 1  # the preset's last node is not refused
    for args in (['--dropout=0.1', '--lr=0.003', '--decay=7'], ['--cd_dropout=0.1', '--cd_lr=0.003', '--cd_decay=7'],
            ['--dropout=0.1', '--cd_dropout=0.1', '--cd_lr=0.003', '--decay=7']):
        c = config_for(*base, '--preset=cd-tiny-img16', *args)
        assert (c.network_kwargs.dropout, c.lr_kwargs.ref_lr, c.lr_kwargs.ref_batches) == (0.1, 0.003, 7), args
    for name in ('cd-edm2-img64-s', 'cd-edm2-img512-s'):  # the study's one-evaluation teacher step, carried over
        c = config_for(*base, f'--preset={name}', '--batch=32')
        assert (c.loss_kwargs.teacher_solver, c.lr_kwargs.ref_lr) == ('ddim', 0.001)
        assert c.loss_kwargs.teacher_solver != config_for(*base, f'--preset={name}', '--batch=32',
            '--teacher_solver=heun').loss_kwargs.teacher_solver
    c = config_for(*base, '--preset=cd-tiny-img16', '--cd_huber_c=0.015')
    assert c.loss_kwargs.pseudo_huber_c == 0.015 and 'huber_delta' not in c.loss_kwargs
    c = config_for(*base, '--preset=edm2-img64-m', '--duration=1Ki', '--batch=32')  # preset dropout 0.1 is the teacher's
    assert c.network_kwargs.dropout == 0.0 and c.network_kwargs.model_channels == 16


def test_dout_resolutions_in_plain_training(data16):
    from training.networks_edm2 import Precond
    c = config_for(f'--data={data16}', '--cond=False', '--preset=tiny-img16', '--dropout=0.25', '--dout_resolutions=8')
    assert c.network_kwargs.dout_resolutions == [8]
    net = Precond(img_resolution=16, img_channels=3, **{k: v for k, v in c.network_kwargs.items() if k != 'class_name'})
    rates = {name: block.dropout for name, block in net.unet.enc.items() if hasattr(block, 'dropout')}
    assert rates == {'16x16_block0': 0, '8x8_down': 0.25, '8x8_block0': 0.25}


@pytest.mark.slow
def test_edm2_img64_preset_trains_and_distils_on_small_data(tmp_path):
    labels = [i % 10 for i in range(64)]
    data16 = write_image_zip(tmp_path / 'd16.zip', 64, 16, labels=labels)
    data32 = write_image_zip(tmp_path / 'd32.zip', 32, 32, labels=labels[:32])
    schedule = ['--preset=edm2-img64-s', '--batch=32', '--status=256', '--snapshot=1Ki', '--checkpoint=1Ki']
    for data, outdir, duration in [(data32, 'teacher32', '64'), (data16, 'teacher16', '1Ki')]:
        run_script('train_edm2.py', f'--outdir={tmp_path / outdir}', f'--data={data}', '--channels=8',
            f'--duration={duration}', *schedule)
    teacher = load_pickle(tmp_path / 'teacher16' / 'network-snapshot-0000001-0.100.pkl')['ema']
    assert (teacher.img_resolution, teacher.label_dim, list(teacher.unet.enc)[-1]) == (16, 10, '2x2_block2')

    run_script('train_edm2.py', f'--outdir={tmp_path / "student"}', f'--data={data16}',
        f'--teacher={tmp_path / "teacher16" / "network-snapshot-0000001-0.100.pkl"}', '--duration=1Ki', '--cd_lr=0.001',
        '--S=2', '--T_start=4', '--T_end=8', *schedule)
    student = tmp_path / 'student' / 'network-snapshot-0000001-0.100.pkl'
    assert load_pickle(student)['cd']['S'] == 2
    run_script('generate_images.py', f'--net={student}', f'--outdir={tmp_path / "out"}', '--seeds=0-3')
    assert sorted(os.listdir(tmp_path / 'out')) == [f'{seed:06d}.png' for seed in range(4)]


@pytest.mark.slow
def test_checkpoint_keep_recent(data16, tmp_path):
    outdir = tmp_path / 'run'
    args = [f'--outdir={outdir}', f'--data={data16}', '--cond=False', '--preset=tiny-img16', '--channels=8',
        '--batch=32', '--status=1Ki', '--snapshot=0', '--checkpoint=1Ki', '--checkpoint_keep_recent=2']
    run_script('train_edm2.py', *args, '--duration=3Ki')
    assert sorted(name for name in os.listdir(outdir) if name.endswith('.pt')) == \
        ['training-state-0000002.pt', 'training-state-0000003.pt']
    result = run_script('train_edm2.py', *args, '--duration=4Ki', check=False)  # resumes from the newest kept state
    assert result.returncode == 0 and 'training-state-0000003.pt ... done' in result.stdout
    assert sorted(name for name in os.listdir(outdir) if name.endswith('.pt')) == \
        ['training-state-0000003.pt', 'training-state-0000004.pt']
