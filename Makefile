# The two commands of the README's quick start.
.PHONY: demo test

demo:
	scripts/install.sh
	.venv/bin/ember run demo "The three primary colours are" --param temperature=0 --param num_predict=48

test:
	scripts/install.sh test
	scripts/test.sh
