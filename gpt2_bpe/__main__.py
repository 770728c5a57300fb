"""`python -m gpt2_bpe`: compile gpt2_bpe.c now (make setup does), printing the library's path."""
from gpt2_bpe import build

print(build())
