"""What the stages train on: pretraining text and its token cache, the language mix, chat templates rendered as
trained/untrained segments, and chat data packed into rows."""
