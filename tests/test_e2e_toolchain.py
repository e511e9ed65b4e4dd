"""The EDM2 toolchain end to end through its command lines: dataset -> training -> sampling -> metrics -> phema."""

import os

import pytest

from helpers import load_pickle, make_digits_zip, run_script


@pytest.mark.slow
def test_digits_to_metrics_and_phema(tmp_path, detectors):
    _, detector_paths = detectors
    data, run_dir = tmp_path / 'digits.zip', tmp_path / 'run'
    make_digits_zip(data, max_images=128)  # dataset_tool.py convert --source=sklearn-digits
    run_script('train_edm2.py', f'--outdir={run_dir}', f'--data={data}', '--preset=tiny-img16', '--batch=16',
        '--duration=2048', '--status=512', '--snapshot=1024', '--checkpoint=2048')
    snapshots = sorted(name for name in os.listdir(run_dir) if name.startswith('network-snapshot-'))
    assert snapshots == [f'network-snapshot-{kimg:07d}-{std}.pkl' for kimg in range(3) for std in ('0.050', '0.100')]

    images = tmp_path / 'images'
    net = run_dir / 'network-snapshot-0000002-0.100.pkl'
    run_script('generate_images.py', f'--net={net}', f'--outdir={images}', '--seeds=0-7', '--steps=4')
    assert len(os.listdir(images)) == 8

    ref = tmp_path / 'ref.pkl'
    fid_detector = f'--detector=fid={detector_paths["fid"]}'
    run_script('calculate_metrics.py', 'ref', f'--data={data}', f'--dest={ref}', '--metrics=fid', '--workers=0', fid_detector)
    result = run_script('calculate_metrics.py', 'calc', f'--images={images}', f'--ref={ref}', '--metrics=fid', '--num=8',
        '--workers=0', fid_detector)
    assert 'fid' in result.stdout.lower()

    phema = tmp_path / 'phema'
    run_script('reconstruct_phema.py', f'--indir={run_dir}', f'--outdir={phema}', '--outstd=0.070')
    reconstructed = load_pickle(phema / 'phema-0000002-0.070.pkl')
    assert set(reconstructed) >= {'ema', 'encoder', 'dataset_kwargs'}
