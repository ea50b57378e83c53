"""The validate -> infer -> persist chain written with peer libraries (faust-streaming, Quix
Streams). Run only inside the peers' own virtualenv (``bench/peers/setup.sh``)."""
