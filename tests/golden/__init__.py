"""Golden outputs: the exact bytes the commands produce, recorded to prove a change kept them."""
