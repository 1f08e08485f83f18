"""`python -m vlmo …` runs the `vlmo` command; so does `torchrun -m vlmo finetune …` in every process it starts."""

from vlmo.cli.commands import main

if __name__ == "__main__":
    main()
