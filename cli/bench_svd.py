"""Commands of this module are registered on the apps in fasttrunc.cli.apps."""
