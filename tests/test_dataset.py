import json
import os
import pickle

import numpy as np
import pytest

from helpers import image_set, latent_files, npy_bytes, png_bytes, random_images, write_dataset
from training.dataset import DatasetError, ImageFolderDataset, SampleFolder

# Datasets are written directly with PIL/numpy (helpers.write_dataset, image_set), independent of dataset_tool.py.

#----------------------------------------------------------------------------

@pytest.mark.parametrize('as_zip', [False, True])
def test_images_labels_and_properties(tmp_path, as_zip):
    images = random_images(7)
    classes = [2, 0, 4, 1, 2, 0, 3]
    files, labels = image_set(images, classes)
    path = write_dataset(tmp_path / 'mydata', files, labels, as_zip=as_zip)
    ds = ImageFolderDataset(path, resolution=8, use_labels=True)

    assert ds.name == 'mydata'
    assert len(ds) == 7
    assert ds.image_shape == [3, 8, 8] and ds.num_channels == 3 and ds.resolution == 8
    assert ds.label_shape == [5] and ds.label_dim == 5
    assert ds.has_labels and ds.has_onehot_labels
    for idx in range(7):
        image, label = ds[idx]
        assert image.dtype == np.uint8 and image.shape == (3, 8, 8)
        np.testing.assert_array_equal(image, images[idx].transpose(2, 0, 1))
        assert label.dtype == np.float32 and label.tolist() == np.eye(5)[classes[idx]].tolist()
        details = ds.get_details(idx)
        assert details.raw_idx == idx and details.xflip is False and int(details.raw_label) == classes[idx]

def test_labels_read_by_default(tmp_path):
    files, labels = image_set(random_images(4), [0, 1, 2, 3])
    ds = ImageFolderDataset(write_dataset(tmp_path / 'd', files, labels)) # use_labels=True by default, as in EDM2
    assert ds.label_dim == 4 and ds.has_labels
    assert ds[2][1].tolist() == [0, 0, 1, 0]

def test_labels_ignored_when_disabled(tmp_path):
    files, labels = image_set(random_images(4), [0, 1, 2, 3])
    ds = ImageFolderDataset(write_dataset(tmp_path / 'd', files, labels), use_labels=False)
    assert ds.label_dim == 0 and not ds.has_labels
    assert ds[2][1].shape == (0,)

def test_without_dataset_json_or_null_labels(tmp_path):
    files, _ = image_set(random_images(3))
    for name, labels in [('nojson', None), ('nulllabels', 'null')]:
        path = write_dataset(tmp_path / name, files)
        if labels == 'null':
            with open(os.path.join(path, 'dataset.json'), 'w') as f:
                f.write('{"labels": null}')
        ds = ImageFolderDataset(path, use_labels=True)
        assert ds.label_shape == [0] and not ds.has_labels
        assert ds[0][1].shape == (0,)

def test_vector_labels_are_used_as_given(tmp_path):
    files, _ = image_set(random_images(3))
    vectors = [[0.5, -1.0], [2.0, 0.25], [0.0, 3.0]]
    labels = [[name, vec] for name, vec in zip(sorted(files), vectors)]
    ds = ImageFolderDataset(write_dataset(tmp_path / 'd', files, labels), use_labels=True)
    assert ds.label_shape == [2] and not ds.has_onehot_labels
    np.testing.assert_array_equal(ds[1][1], np.float32(vectors[1]))

def test_files_sorted_by_path_and_other_files_ignored(tmp_path):
    images = random_images(3)
    files = {'b/z.png': png_bytes(images[0]), 'a.png': png_bytes(images[1]), 'b/a.png': png_bytes(images[2]), 'notes.txt': b'hello'}
    ds = ImageFolderDataset(write_dataset(tmp_path / 'd', files))
    assert len(ds) == 3
    for idx, source in enumerate([1, 2, 0]): # a.png, b/a.png, b/z.png
        np.testing.assert_array_equal(ds[idx][0], images[source].transpose(2, 0, 1))

def test_grayscale_png_has_one_channel(tmp_path):
    images = random_images(2, channels=1)
    files, _ = image_set(images)
    ds = ImageFolderDataset(write_dataset(tmp_path / 'd', files))
    assert ds.num_channels == 1
    np.testing.assert_array_equal(ds[1][0][0], images[1])

def test_npy_latents(tmp_path):
    latents = np.random.RandomState(1).randn(3, 8, 4, 4).astype(np.float32)
    ds = ImageFolderDataset(write_dataset(tmp_path / 'latents', latent_files(latents), as_zip=True), resolution=4)
    assert ds.image_shape == [8, 4, 4] and ds.resolution == 4
    image, _ = ds[2]
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, latents[2])

def test_xflip_doubles_and_mirrors(tmp_path):
    images = random_images(3)
    files, labels = image_set(images, [0, 1, 2])
    ds = ImageFolderDataset(write_dataset(tmp_path / 'd', files, labels), use_labels=True, xflip=True)
    assert len(ds) == 6
    for idx in range(3):
        plain, plain_label = ds[idx]
        mirrored, mirrored_label = ds[idx + 3]
        np.testing.assert_array_equal(plain, images[idx].transpose(2, 0, 1))
        np.testing.assert_array_equal(mirrored, images[idx][:, ::-1].transpose(2, 0, 1))
        np.testing.assert_array_equal(plain_label, mirrored_label)
        assert ds.get_details(idx + 3).xflip is True

def test_max_size_picks_a_seeded_sorted_subset(tmp_path):
    images = random_images(20, size=4)
    files, _ = image_set(images)
    path = write_dataset(tmp_path / 'd', files)
    picks = {}
    for seed in [0, 1]:
        ds = ImageFolderDataset(path, max_size=6, random_seed=seed)
        assert len(ds) == 6
        raw = [ds.get_details(idx).raw_idx for idx in range(6)]
        assert raw == sorted(set(raw))
        for idx, raw_idx in enumerate(raw):
            np.testing.assert_array_equal(ds[idx][0], images[raw_idx].transpose(2, 0, 1))
        picks[seed] = raw
    assert picks[0] != picks[1]
    assert [ImageFolderDataset(path, max_size=6).get_details(i).raw_idx for i in range(6)] == picks[0]
    assert len(ImageFolderDataset(path, max_size=50)) == 20
    assert len(ImageFolderDataset(path, max_size=6, xflip=True)) == 12

def test_cache_keeps_decoded_images(tmp_path):
    images = random_images(3)
    files, _ = image_set(images)
    path = write_dataset(tmp_path / 'd', files)
    ds = ImageFolderDataset(path, cache=True)
    first = ds[1][0]
    for name in sorted(files)[1:]:
        os.remove(os.path.join(path, name))
    np.testing.assert_array_equal(ds[1][0], first) # served from memory, not from the deleted file
    with pytest.raises(ValueError, match='img00000002.png'):
        ds[2]

def test_pickle_drops_zip_handle(tmp_path):
    images = random_images(3)
    files, labels = image_set(images, [1, 0, 1])
    ds = ImageFolderDataset(write_dataset(tmp_path / 'd', files, labels, as_zip=True), use_labels=True)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[2][0], images[2].transpose(2, 0, 1))
    np.testing.assert_array_equal(clone[2][1], [0, 1])

#----------------------------------------------------------------------------
# Bad inputs.

def test_errors_are_user_errors():
    import dnnlib
    assert issubclass(DatasetError, dnnlib.UserError) and issubclass(DatasetError, ValueError)

def test_missing_path(tmp_path):
    missing = str(tmp_path / 'nowhere.zip')
    with pytest.raises(DatasetError, match='nowhere.zip does not exist'):
        ImageFolderDataset(missing)

def test_path_that_is_not_a_dataset(tmp_path):
    path = tmp_path / 'data.txt'
    path.write_text('hello')
    with pytest.raises(DatasetError, match='data.txt'):
        ImageFolderDataset(str(path))
    broken_zip = tmp_path / 'broken.zip'
    broken_zip.write_bytes(b'not a zip archive')
    with pytest.raises(DatasetError, match='broken.zip'):
        ImageFolderDataset(str(broken_zip))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetError, match='no PNG/NPY'):
        ImageFolderDataset(str(tmp_path / 'empty'))

def test_dataset_json_names_a_missing_file(tmp_path):
    files, labels = image_set(random_images(3), [0, 1, 2])
    labels.append(['00005/img00000099.png', 1])
    path = write_dataset(tmp_path / 'd', files, labels, as_zip=True)
    with pytest.raises(DatasetError, match='img00000099.png'):
        ImageFolderDataset(path, use_labels=True)
    assert len(ImageFolderDataset(path, use_labels=False)) == 3

def test_image_without_label(tmp_path):
    files, labels = image_set(random_images(3), [0, 1, 2])
    del labels[1]
    with pytest.raises(DatasetError, match='img00000001.png'):
        ImageFolderDataset(write_dataset(tmp_path / 'd', files, labels), use_labels=True)

def test_malformed_dataset_json(tmp_path):
    files, _ = image_set(random_images(2))
    files['dataset.json'] = b'{"labels": [1, 2'
    with pytest.raises(DatasetError, match='dataset.json'):
        ImageFolderDataset(write_dataset(tmp_path / 'd', files), use_labels=True)

@pytest.mark.parametrize('as_zip', [False, True])
def test_corrupt_png_is_named(tmp_path, as_zip):
    files, _ = image_set(random_images(3))
    bad_name = sorted(files)[2]
    files[bad_name] = files[bad_name][:40] # truncated PNG
    ds = ImageFolderDataset(write_dataset(tmp_path / 'd', files, as_zip=as_zip))
    ds[1]
    with pytest.raises(DatasetError, match=bad_name):
        ds[2]
    files[sorted(files)[0]] = b'garbage'
    with pytest.raises(DatasetError, match=sorted(files)[0]):
        ImageFolderDataset(write_dataset(tmp_path / 'e', files, as_zip=as_zip))

@pytest.mark.parametrize('as_zip', [False, True])
@pytest.mark.parametrize('damage, error', [
    (lambda data: data[:len(data) // 2], 'truncated'), # header intact, pixel data cut off: PIL's truncated-image error
    (lambda data: np.random.RandomState(5).bytes(len(data)), 'not an image file'), # random bytes named .png
])
def test_damaged_png_read_gives_dataset_error(tmp_path, as_zip, damage, error):
    files, _ = image_set(random_images(3, size=16))
    bad_name = sorted(files)[1]
    files[bad_name] = damage(files[bad_name])
    path = write_dataset(tmp_path / 'd', files, as_zip=as_zip)
    ds = ImageFolderDataset(path)
    ds[0], ds[2]
    with pytest.raises(DatasetError, match=f'{bad_name} in dataset {path}: .*{error}'):
        ds[1]

@pytest.mark.parametrize('bad', [b'random bytes, not numpy', npy_bytes(np.zeros(4, np.float32)), npy_bytes(np.array(['ab', 'cd'])),
                                 npy_bytes(np.zeros([8, 4, 4], np.float32))[:-10]])
def test_bad_npy_gives_dataset_error(tmp_path, bad):
    files = latent_files([np.zeros([8, 4, 4], np.float32)] * 3)
    files['00000/img-mean-std-00000001.npy'] = bad
    ds = ImageFolderDataset(write_dataset(tmp_path / 'latents', files, as_zip=True))
    ds[0]
    with pytest.raises(DatasetError, match='img-mean-std-00000001.npy'):
        ds[1]

def test_mixed_resolutions_are_named(tmp_path):
    files, _ = image_set(random_images(3))
    files['00000/img00000001.png'] = png_bytes(random_images(1, size=16)[0])
    ds = ImageFolderDataset(write_dataset(tmp_path / 'd', files))
    with pytest.raises(DatasetError, match='img00000001.png'):
        ds[1]

#----------------------------------------------------------------------------
# Label values in dataset.json.

def labelled_set(tmp_path, values, as_zip=False):
    files, _ = image_set(random_images(len(values)))
    names = sorted(files)
    path = write_dataset(tmp_path / 'd', files, [[name, value] for name, value in zip(names, values)], as_zip=as_zip)
    return path, names

@pytest.mark.parametrize('bad, why', [
    (-1, 'negative'), (5.5, 'not an integer'), ('a', 'is a string'), (True, 'is true'), (None, 'is null'),
    ([1, 2, 3], 'with 3 values, but .*img00000000.png has 2'), ([float('nan'), 1.0], 'not a finite float32'),
    ([1e300, 0.0], 'not a finite float32'), ([[1], [2]], 'not a flat list'), ({'x': 1}, 'is a JSON object'),
])
@pytest.mark.parametrize('as_zip', [False, True])
def test_bad_label_names_dataset_and_file(tmp_path, bad, why, as_zip):
    vectors = isinstance(bad, list) and bad != [[1], [2]]
    good = [0.5, 1.0] if vectors else 1
    path, names = labelled_set(tmp_path, [good, good, bad, good], as_zip=as_zip)
    with pytest.raises(DatasetError, match=f'{path}: {names[2]} has .*{why}') as info:
        ImageFolderDataset(path, use_labels=True)
    assert 'label problems in all' not in str(info.value) # only one bad label
    assert len(ImageFolderDataset(path, use_labels=False)) == 4 # labels are not read when not used

def test_negative_label_no_longer_wraps_to_the_last_class(tmp_path):
    path, names = labelled_set(tmp_path, [0, 1, 2, -1])
    with pytest.raises(DatasetError, match=names[3]):
        ImageFolderDataset(path)

def test_first_bad_label_and_count(tmp_path):
    path, names = labelled_set(tmp_path, [0, -3, 2, 'x', 1.5])
    with pytest.raises(DatasetError, match=f'{names[1]} has the label -3, .*3 label problems in all'):
        ImageFolderDataset(path)
    labels, problems = SampleFolder(path).read_labels()
    assert labels is None and [name for name, _why in problems] == [names[1], names[3], names[4]]

def test_class_and_vector_labels_do_not_mix(tmp_path):
    path, names = labelled_set(tmp_path, [[0.5, 1.0], 2, [0.0, 0.0]])
    with pytest.raises(DatasetError, match=f'{names[1]} has the label 2, which is a class index, but .*{names[0]} has a vector'):
        ImageFolderDataset(path)

def test_integral_float_class_and_large_vectors_are_accepted(tmp_path):
    ds = ImageFolderDataset(labelled_set(tmp_path, [0, 3.0, 1])[0])
    assert ds.has_onehot_labels and ds.label_dim == 4 and ds[1][1].tolist() == [0, 0, 0, 1]
    vectors = [[1e30, -2, 0], [0.25, 0, 1], [3, 4, 5]]
    ds = ImageFolderDataset(labelled_set(tmp_path / 'v', vectors)[0])
    assert ds.label_shape == [3] and ds[0][1].dtype == np.float32
    np.testing.assert_array_equal(ds[0][1], np.float32(vectors[0]))

def test_duplicate_and_malformed_entries(tmp_path):
    files, labels = image_set(random_images(3), [0, 1, 2])
    labels.append([labels[1][0], 2])
    with pytest.raises(DatasetError, match=f'{labels[1][0]} is listed more than once'):
        ImageFolderDataset(write_dataset(tmp_path / 'd', files, labels))
    for bad in [{'00000/img00000000.png': 0}, [['00000/img00000000.png', 0, 1]], [[3, 0]], 'labels']:
        with open(os.path.join(tmp_path / 'd', 'dataset.json'), 'w') as f:
            json.dump({'labels': bad}, f)
        with pytest.raises(DatasetError, match='dataset.json'):
            ImageFolderDataset(str(tmp_path / 'd'))
    with open(os.path.join(tmp_path / 'd', 'dataset.json'), 'w') as f:
        json.dump([['00000/img00000000.png', 0]], f) # the list without the {"labels": ...} around it
    with pytest.raises(DatasetError, match='dataset.json'):
        ImageFolderDataset(str(tmp_path / 'd'))

def test_resolution_mismatch(tmp_path):
    files, _ = image_set(random_images(2))
    with pytest.raises(DatasetError, match='resolution=16'):
        ImageFolderDataset(write_dataset(tmp_path / 'd', files), resolution=16)

#----------------------------------------------------------------------------
