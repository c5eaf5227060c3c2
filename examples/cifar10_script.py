"""examples/cifar10_centralized.py made a federated client: `diff` the two to see what it took.

fl-server --insecure                                               # the reference job's server
FL_SERVER=localhost:50051 FL_CLIENT_ID=1 FL_INSECURE=1 python examples/cifar10_script.py
(and FL_CLIENT_ID=2, 3; FL_DATA names a local copy of CIFAR-10 for the server and each client)
"""

import os

import fedgrpc.client as fl
import keras
from fedgrpc.common.data import load_split

train, test = load_split(os.environ.get("FL_DATA"), "train"), load_split(os.environ.get("FL_DATA"), "test")
x_train, y_train = train.x.astype("float32") / 255.0, keras.utils.to_categorical(train.y, 10)
x_test, y_test = test.x.astype("float32") / 255.0, keras.utils.to_categorical(test.y, 10)
federation = fl.connect()
x_train, y_train = federation.shard(x_train, y_train)

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

for epoch, round in enumerate(federation.rounds(model)):
    model.fit(x_train, y_train, epochs=1, batch_size=32, verbose=2)
    round.submit(model, num_examples=len(x_train))
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"epoch {epoch + 1}: test accuracy {accuracy:.4f}")
