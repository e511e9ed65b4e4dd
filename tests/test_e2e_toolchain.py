"""The EDM2 toolchain end to end through its command lines: dataset -> training -> sampling -> metrics -> phema."""

import os
import pickle
import subprocess
import sys

import pytest

from test_calculate_metrics import detectors  # noqa: F401 (fixture: tiny local detector pickles)


def run(args, env, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f'{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


@pytest.mark.slow
def test_digits_to_metrics_and_phema(tmp_path, repo_root, subprocess_env, detectors):  # noqa: F811
    _, detector_paths = detectors
    data, run_dir = tmp_path / 'digits.zip', tmp_path / 'run'
    run(['dataset_tool.py', 'convert', '--source=sklearn-digits', f'--dest={data}', '--resolution=16x16',
        '--max-images=128'], subprocess_env, repo_root)
    run(['train_edm2.py', f'--outdir={run_dir}', f'--data={data}', '--preset=tiny-img16', '--batch=16',
        '--duration=2048', '--status=512', '--snapshot=1024', '--checkpoint=2048'], subprocess_env, repo_root)
    snapshots = sorted(name for name in os.listdir(run_dir) if name.startswith('network-snapshot-'))
    assert snapshots == [f'network-snapshot-{kimg:07d}-{std}.pkl' for kimg in range(3) for std in ('0.050', '0.100')]

    images = tmp_path / 'images'
    net = run_dir / 'network-snapshot-0000002-0.100.pkl'
    run(['generate_images.py', f'--net={net}', f'--outdir={images}', '--seeds=0-7', '--steps=4'], subprocess_env, repo_root)
    assert len(os.listdir(images)) == 8

    ref = tmp_path / 'ref.pkl'
    fid_detector = f'--detector=fid={detector_paths["fid"]}'
    run(['calculate_metrics.py', 'ref', f'--data={data}', f'--dest={ref}', '--metrics=fid', '--workers=0', fid_detector],
        subprocess_env, repo_root)
    result = run(['calculate_metrics.py', 'calc', f'--images={images}', f'--ref={ref}', '--metrics=fid', '--num=8',
        '--workers=0', fid_detector], subprocess_env, repo_root)
    assert 'fid' in result.stdout.lower()

    phema = tmp_path / 'phema'
    run(['reconstruct_phema.py', f'--indir={run_dir}', f'--outdir={phema}', '--outstd=0.070'], subprocess_env, repo_root)
    with open(phema / 'phema-0000002-0.070.pkl', 'rb') as f:
        reconstructed = pickle.load(f)
    assert set(reconstructed) >= {'ema', 'encoder', 'dataset_kwargs'}
