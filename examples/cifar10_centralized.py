"""CIFAR-10 on one machine: the small CNN, 10 epochs. examples/cifar10_script.py is this
script made a federated client; `diff` the two to see what it took.

    FL_DATA=../shared/data/cifar10-jpeg.tar.gz python examples/cifar10_centralized.py
"""

import os

import keras
from fedgrpc.common.data import load_split

train, test = load_split(os.environ.get("FL_DATA"), "train"), load_split(os.environ.get("FL_DATA"), "test")
x_train, y_train = train.x.astype("float32") / 255.0, keras.utils.to_categorical(train.y, 10)
x_test, y_test = test.x.astype("float32") / 255.0, keras.utils.to_categorical(test.y, 10)

model = keras.Sequential(
    [
        keras.Input(shape=(32, 32, 3)),
        keras.layers.Conv2D(32, (3, 3), activation="relu"),
        keras.layers.MaxPooling2D((2, 2)),
        keras.layers.Conv2D(64, (3, 3), activation="relu"),
        keras.layers.MaxPooling2D((2, 2)),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ]
)
model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])

for epoch in range(10):
    model.fit(x_train, y_train, epochs=1, batch_size=32, verbose=2)
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"epoch {epoch + 1}: test accuracy {accuracy:.4f}")
