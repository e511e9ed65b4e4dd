"""The digit feature network of quickstart.py: the detector behind its FD_digits metric.

DigitClassifier is a small CNN for uint8 RGB digit images. Called on a batch, it returns the
penultimate-layer features, so that a pickle of a trained one is a feature detector for
calculate_metrics.py (`--metrics=fd_digits --detector=fd_digits=digit-features.pkl`) and for validation
during training (`train_edm2.py --val_metrics=fd_digits --detector=fd_digits=...`);
class_probabilities() gives its class predictions. The class is persistent (torch_utils.persistence):
its pickle carries the source of this module and loads in any process that has torch and torch_utils,
like a network pickle.
"""

import torch

from torch_utils import persistence

#----------------------------------------------------------------------------

@persistence.persistent_class
class DigitClassifier(torch.nn.Module):
    """Three strided convolutions, a linear layer to `feature_dim` features, and a linear class head.

    Input: uint8 NCHW images with `img_channels` channels (0-255). forward() returns the [N, feature_dim]
    features; logits() and class_probabilities() the [N, num_classes] class scores.
    """

    def __init__(self, num_classes=10, feature_dim=64, img_channels=3):
        super().__init__()
        self.num_classes, self.feature_dim, self.img_channels = num_classes, feature_dim, img_channels
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(img_channels, 16, kernel_size=3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
            torch.nn.Linear(64 * 4 * 4, feature_dim), torch.nn.SiLU())
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def forward(self, images):
        """Penultimate-layer features [N, feature_dim] (float32) of uint8 images [N, C, H, W]."""
        return self.trunk(images.to(torch.float32) / 127.5 - 1)

    def logits(self, images):
        return self.head(self(images))

    def class_probabilities(self, images):
        """Softmax class probabilities [N, num_classes] of uint8 images [N, C, H, W]."""
        return self.logits(images).softmax(dim=1)

#----------------------------------------------------------------------------

def train_digit_classifier(images, labels, num_classes, epochs=10, batch_size=64, lr=2e-3, seed=0):
    """Fit a DigitClassifier to uint8 images [N, C, H, W] and integer labels [N] with Adam and cross-entropy,
    on the CPU. Returns it in eval mode without gradients, ready to be pickled as a detector."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
    with torch.random.fork_rng(devices=[]):  # seeds this network only, not the caller's later draws
        torch.manual_seed(seed)
        net = DigitClassifier(num_classes=num_classes, img_channels=images.shape[1])
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    net.train()
    for _epoch in range(epochs):
        for batch in torch.randperm(len(images), generator=shuffle).split(batch_size):
            loss = torch.nn.functional.cross_entropy(net.logits(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval().requires_grad_(False)

#----------------------------------------------------------------------------
